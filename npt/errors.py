"""User-facing errors.

Every problem a user can fix (a bad flag, a missing model, a dataset without the text column, ...)
is raised as `NPTError` with the cause and the fix. The CLI prints it as one line and exits non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""


class NPTError(Exception):
    """An error the user can act on: `cause` says what is wrong, `fix` what to do about it."""

    def __init__(self, cause: str, fix: str = ""):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} Fix: {fix}" if fix else cause)


class UnsupportedArchitectureError(NPTError):
    pass
