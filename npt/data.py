"""Text data: sources, held-out split, tokenisation, packing, shuffling, resumable state.

Documents come from the embedded corpus, local files (txt, json/jsonl, csv, parquet, or a folder
of them) or a hub dataset, streamed or not. Each document is assigned to the held-out set or to
training by a hash of its text, so the two never share a document (nor a block, since blocks are
packed separately), whatever the order, the seed or the number of processes. Documents are
tokenised, joined with EOS and cut into fixed-length blocks; a buffer of blocks gives a
deterministic shuffle. When the tokenizer itself puts a BOS token in front of every text (Llama 3,
Gemma, the built-in teachers; not SmolLM2), every block starts with BOS, as such models were
trained and as llama.cpp's and lm-evaluation-harness's perplexities feed them: a block cut from the
middle of a document gets BOS followed by `max_length - 1` tokens of the stream, a block that starts
where a document starts keeps that document's own BOS (no second one). The whole stream position (documents read, leftover tokens, shuffle
buffer, RNG) is a `state_dict`, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import torch
from transformers.hf_argparser import HfArg

from .corpus import PREFIX as CORPUS_PREFIX
from .corpus import load_corpus
from .errors import NPTError

EXTENSION_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
HELDOUT_BUCKETS = 10_000


def is_heldout(text: str, eval_fraction: float) -> bool:
    """Deterministic, order-free split: a document is held out iff its hash falls in the lowest
    `eval_fraction` of buckets. Identical documents land on the same side."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_BUCKETS < round(eval_fraction * HELDOUT_BUCKETS)


@dataclasses.dataclass
class DataArguments:
    dataset_name: str | None = HfArg(default=None, help="Hub dataset name, a local dataset folder, or embedded:<docstrings|code|prose|mixed>. Default: the corpus of the embedded or zoo teacher (docstrings for other models).")
    dataset_config: str | None = HfArg(default=None, aliases=["--dataset_config_name"], help="Dataset configuration name (the second argument of load_dataset).")
    data_files: list[str] | None = HfArg(default=None, help="Local text files or folders (txt, json/jsonl, csv, parquet).")
    dataset_split: str = HfArg(default="train", help="Dataset split to read.")
    text_column: str = HfArg(default="text", aliases=["--text_column_name"], help="Column holding the text.")
    streaming: bool = HfArg(default=False, help="Stream the dataset instead of downloading/preparing it whole.")
    max_length: int = HfArg(default=128, aliases=["--block_size"], help="Tokens per training block (documents are packed, EOS between them).")
    eval_fraction: float = HfArg(default=0.02, help="Fraction of documents held out (chosen by a hash of the text).")
    eval_blocks: int = HfArg(default=32, help="Number of held-out blocks used for evaluation.")
    shuffle_buffer: int = HfArg(default=1024, help="Blocks in the shuffle buffer.")

    def __post_init__(self):
        if self.max_length < 2:
            raise NPTError(f"--max_length {self.max_length} is too short.", "Pass --max_length of at least 2 (typically 512-2048).")
        if not 0 < self.eval_fraction < 1:
            raise NPTError(f"--eval_fraction {self.eval_fraction} is outside (0, 1).", "Pass e.g. --eval_fraction 0.02.")
        if self.eval_blocks < 1:
            raise NPTError(f"--eval_blocks {self.eval_blocks} must be at least 1.", "Pass --eval_blocks >= 1.")
        if self.shuffle_buffer < 0:
            raise NPTError(f"--shuffle_buffer {self.shuffle_buffer} is negative.", "Pass --shuffle_buffer >= 0.")
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]


def with_default_dataset(data: DataArguments, dataset_name: str) -> DataArguments:
    """`data` as given when it names a dataset or files; else the same with `dataset_name` (the
    model's built-in corpus, `ModelArguments.default_dataset`)."""
    if data.dataset_name or data.data_files:
        return data
    return dataclasses.replace(data, dataset_name=dataset_name)


# ---- document sources -------------------------------------------------------------------------


class IndexedSource:
    """Documents held in memory or in a map-style dataset: a fresh permutation each epoch."""

    def __init__(self, docs: Sequence, text_column: str | None, seed: int):
        self.docs, self.text_column, self.seed = docs, text_column, seed
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return len(self.docs)

    def _text(self, i: int) -> str:
        row = self.docs[i]
        return row if self.text_column is None else row[self.text_column]

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.docs), generator=g)

    def iter_epoch(self) -> Iterator[str]:
        """The rest of the current epoch; `self.pos` always counts the documents already yielded."""
        order = self._order(self.epoch)
        while self.pos < len(order):
            self.pos += 1
            yield self._text(int(order[self.pos - 1]))

    def next_epoch(self) -> None:
        self.epoch, self.pos = self.epoch + 1, 0

    def iter_natural(self) -> Iterator[str]:
        """All documents in stored order (for building the held-out set)."""
        for i in range(len(self.docs)):
            yield self._text(i)

    def state_dict(self) -> dict:
        return {"kind": "indexed", "epoch": self.epoch, "pos": self.pos, "num_docs": len(self.docs)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "indexed" or state.get("num_docs") != len(self.docs):
            raise NPTError(
                "The checkpoint's data position belongs to another dataset (different kind or size).",
                "Resume with the same --dataset_name/--data_files/--streaming as the original run.",
            )
        self.epoch, self.pos = state["epoch"], state["pos"]


class StreamSource:
    """A `datasets.IterableDataset`, read in order; its own state_dict gives the position."""

    def __init__(self, dataset, text_column: str):
        self.dataset, self.text_column = dataset, text_column
        self.epoch = 0

    def iter_epoch(self) -> Iterator[str]:
        for row in self.dataset:
            yield row[self.text_column]

    def next_epoch(self) -> None:
        # datasets applies a loaded state only to the epoch it was saved in, so a new epoch
        # starts from the beginning.
        self.epoch += 1
        self.dataset.set_epoch(self.epoch)

    def iter_natural(self) -> Iterator[str]:
        yield from self.iter_epoch()

    def state_dict(self) -> dict:
        return {"kind": "stream", "epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise NPTError(
                "The checkpoint's data position belongs to a non-streamed dataset.",
                "Resume with the same --streaming setting as the original run.",
            )
        self.epoch = state["epoch"]
        self.dataset.set_epoch(self.epoch)
        self.dataset.load_state_dict(state["dataset"])


# ---- opening datasets -------------------------------------------------------------------------


def _files_for(paths: list[str]) -> tuple[str, list[str]]:
    files: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise NPTError(f"Data path {p} does not exist.", "Check --data_files (files or folders of txt/json/jsonl/csv/parquet).")
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSION_BUILDERS)
            if not found:
                raise NPTError(
                    f"Folder {p} holds no txt, json, jsonl, csv or parquet file.", "Point --data_files at the text files."
                )
            files.extend(found)
        else:
            files.append(str(path))
    empty = [f for f in files if Path(f).stat().st_size == 0]
    if empty:
        raise NPTError(f"Data file(s) {empty[:3]} are empty (0 bytes).", "Remove them from --data_files or fill them with text.")
    builders = {EXTENSION_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        odd = [f for f in files if Path(f).suffix.lower() not in EXTENSION_BUILDERS][:3]
        raise NPTError(f"Unsupported data file type: {odd}.", "Use .txt, .json, .jsonl, .csv or .parquet files.")
    if len(builders) > 1:
        raise NPTError(
            f"--data_files mixes file types ({sorted(builders)}).", "Pass files of one type (e.g. only .jsonl) per run."
        )
    return builders.pop(), files


def load_raw_dataset(spec: DataArguments):
    """The documents as a list (embedded corpus), a `datasets.Dataset` or an `IterableDataset`."""
    if not spec.data_files and (spec.dataset_name is None or spec.dataset_name.startswith(CORPUS_PREFIX)):
        return load_corpus((spec.dataset_name or CORPUS_PREFIX + "docstrings").removeprefix(CORPUS_PREFIX))
    try:
        if spec.data_files:
            builder, files = _files_for(spec.data_files)
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=spec.streaming)
        name = spec.dataset_name
        if os.path.sep in name and not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise NPTError(f"Dataset path {name} does not exist.", "Check --dataset_name, or use --data_files for local files.")
        return datasets.load_dataset(name, spec.dataset_config, split=spec.dataset_split, streaming=spec.streaming)
    except NPTError:
        raise
    except (datasets.exceptions.DatasetsError, StopIteration) as e:
        # the builders fail this way on files that hold no rows (e.g. only blank lines) or broken rows
        cause = _innermost(e)
        raise NPTError(
            f"Cannot read dataset {spec.dataset_name or spec.data_files!r}: {type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else 'no rows'}",
            "Check that the files hold rows of text in their format (txt lines, json objects with the text column, csv with a header).",
        ) from None
    except (OSError, ConnectionError, ValueError) as e:
        # datasets raises FileNotFoundError / DatasetNotFoundError (a FileNotFoundError) / ConnectionError /
        # ValueError (bad config or split) for the cases a user can fix.
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        if spec.data_files:
            hint = "Check that the files hold rows of text in their format (txt lines, json objects with the text column, csv with a header)."
        elif offline:
            hint = "The hub is not reachable (offline mode): download the dataset on a connected machine, or use --data_files."
        else:
            hint = "Check the dataset name, --dataset_config and --dataset_split, or use --data_files for local files."
        what = spec.dataset_name or spec.data_files
        raise NPTError(f"Cannot load dataset {what!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", hint) from None


def _innermost(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _check_text_column(raw, column: str) -> None:
    if isinstance(raw, list):
        return
    columns = getattr(raw, "column_names", None)
    if columns is None:  # streamed datasets may not know their features before the first row
        first = next(iter(raw), None)
        if first is None:
            raise NPTError("The dataset is empty.", "Point --dataset_name/--data_files at a dataset with text.")
        columns = list(first)
    if column not in columns:
        raise NPTError(
            f"The dataset has no column {column!r}; its columns are {list(columns)}.",
            f"Pass --text_column with one of {list(columns)}.",
        )


def open_source(spec: DataArguments, seed: int = 0):
    raw = load_raw_dataset(spec)
    _check_text_column(raw, spec.text_column)
    if isinstance(raw, list):
        return IndexedSource(raw, None, seed)
    if isinstance(raw, datasets.Dataset):
        return IndexedSource(raw, spec.text_column, seed)
    return StreamSource(raw, spec.text_column)


# ---- tokenising and packing -------------------------------------------------------------------


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of every text it encodes (asked of the
    tokenizer itself: its post-processor, or `add_bos_token`, whatever it is configured by)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def block_convention(tokenizer) -> str:
    """The block layout in words, for the banner and the reports."""
    if adds_bos(tokenizer):
        return f"every block starts with BOS {tokenizer.bos_token!r} (the tokenizer adds it to every text)"
    return "blocks cut from the packed stream as they fall (the tokenizer adds no BOS)"


class Packer:
    """Tokenises documents and cuts the joined token stream into blocks of `block_len`; with a
    tokenizer that adds BOS, every block starts with it (see the module docstring)."""

    def __init__(self, tokenizer, block_len: int, docs_per_call: int = 64):
        if tokenizer.eos_token_id is None:
            raise NPTError("The tokenizer has no EOS token to separate documents.", "Use a tokenizer with an eos_token.")
        self.tokenizer, self.block_len, self.docs_per_call = tokenizer, block_len, docs_per_call
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.carry: list[int] = []
        self.last_added = 0  # stream tokens the last `add` appended

    def add(self, texts: list[str]) -> list[torch.Tensor]:
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        before = len(self.carry)
        for doc in ids:
            self.carry.extend(doc)
            if not doc or doc[-1] != self.eos:
                self.carry.append(self.eos)
        self.last_added = len(self.carry) - before
        return self._cut()

    def _cut(self) -> list[torch.Tensor]:
        L, carry = self.block_len, self.carry
        if self.bos is None:
            n = len(carry) // L
            if n == 0:
                return []
            blocks = torch.tensor(carry[: n * L], dtype=torch.long).view(n, L)
            del carry[: n * L]
            return list(blocks)
        rows, pos = [], 0
        while pos < len(carry):
            if carry[pos] == self.bos:  # a document starts here: its own BOS opens the block
                if len(carry) - pos < L:
                    break
                rows.append(carry[pos : pos + L])
                pos += L
            else:
                if len(carry) - pos < L - 1:
                    break
                rows.append([self.bos] + carry[pos : pos + L - 1])
                pos += L - 1
        del carry[:pos]
        return list(torch.tensor(rows, dtype=torch.long)) if rows else []

    def blocks(self, docs: Iterator[str]) -> Iterator[torch.Tensor]:
        batch: list[str] = []
        for text in docs:
            batch.append(text)
            if len(batch) == self.docs_per_call:
                yield from self.add(batch)
                batch = []
        if batch:
            yield from self.add(batch)


def heldout_blocks(source, tokenizer, spec: DataArguments, every_document: bool = False) -> torch.Tensor:
    """The first `eval_blocks` blocks packed from held-out documents (from every document with
    `every_document`, for text that was never trained on), in stored order."""
    packer = Packer(tokenizer, spec.max_length)
    out: list[torch.Tensor] = []
    docs = (t for t in source.iter_natural() if t and (every_document or is_heldout(t, spec.eval_fraction)))
    for block in packer.blocks(docs):
        out.append(block)
        if len(out) == spec.eval_blocks:
            break
    if not out:
        raise NPTError(
            f"The held-out set is empty: no held-out document gives a full block of {spec.max_length} tokens "
            f"(eval_fraction {spec.eval_fraction}).",
            "Raise --eval_fraction, lower --max_length, or use a larger dataset.",
        )
    return torch.stack(out)


class TrainStream:
    """Endless, resumable stream of training batches [batch_size, max_length].

    Documents are read a group at a time, tokenised and packed, and the blocks go straight into
    the shuffle buffer. Between two calls the whole position is therefore (documents read,
    leftover tokens, buffer, RNG), which is what `state_dict` saves.

    With several processes, every process reads the same stream and takes its own slice of each
    global batch of `batch_size * world_size` blocks: the processes never see the same block, and
    a run on N processes trains on exactly the batches one process would see with the same
    global batch (so results do not depend on the number of processes, and the data position is
    the same on every process).
    """

    def __init__(self, source, tokenizer, spec: DataArguments, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self.rank, self.world_size = rank, world_size
        self.packer = Packer(tokenizer, spec.max_length)
        self.buffer: list[torch.Tensor] = []
        self.epoch_tokens = 0  # tokens packed so far in the current epoch
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)
        self._docs = self.source.iter_epoch()

    def _fill_once(self) -> None:
        texts: list[str] = []
        exhausted = False
        while len(texts) < self.packer.docs_per_call:
            text = next(self._docs, None)
            if text is None:
                exhausted = True
                break
            if text and not is_heldout(text, self.spec.eval_fraction):
                texts.append(text)
        if texts:
            self.buffer.extend(self.packer.add(texts))
            self.epoch_tokens += self.packer.last_added
        if exhausted:
            self._end_epoch()

    def _end_epoch(self) -> None:
        if self.epoch_tokens == 0:
            raise NPTError(
                "The training split has no text (every document is empty or held out).",
                "Use a larger dataset or a smaller --eval_fraction.",
            )
        if self.epoch_tokens < self.spec.max_length:
            raise NPTError(
                f"The training corpus has {self.epoch_tokens} tokens, fewer than one block of --max_length "
                f"{self.spec.max_length}.",
                "Use more text or a smaller --max_length.",
            )
        self.source.next_epoch()
        self.epoch_tokens = 0
        self._docs = self.source.iter_epoch()

    def _next_block(self) -> torch.Tensor:
        while len(self.buffer) < max(self.spec.shuffle_buffer, 1):
            self._fill_once()
        i = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
        block = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return block

    def next_batch(self) -> torch.Tensor:
        """This process's slice of the next global batch."""
        blocks = [self._next_block() for _ in range(self.batch_size * self.world_size)]
        return torch.stack(blocks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def next_blocks(self, n: int) -> torch.Tensor:
        """The next n blocks, the same on every process."""
        return torch.stack([self._next_block() for _ in range(n)])

    def state_dict(self) -> dict:
        return {
            "source": self.source.state_dict(),
            "carry": torch.tensor(self.packer.carry, dtype=torch.long),
            "buffer": torch.stack(self.buffer) if self.buffer else torch.empty(0, self.spec.max_length, dtype=torch.long),
            "epoch_tokens": self.epoch_tokens,
            "generator": self.generator.get_state(),
            "bos_blocks": self.packer.bos is not None,
        }

    def load_state_dict(self, state: dict) -> None:
        buffer = state["buffer"]
        if buffer.ndim != 2 or (buffer.numel() and buffer.shape[1] != self.spec.max_length):
            raise NPTError(
                f"The checkpoint's data blocks have shape {tuple(buffer.shape)}, not [*, --max_length {self.spec.max_length}].",
                "Resume with the original --max_length.",
            )
        saved_bos = bool(state.get("bos_blocks", False))  # states written before the convention packed without it
        if saved_bos != (self.packer.bos is not None):
            raise NPTError(
                f"The checkpoint's data stream was packed {'with' if saved_bos else 'without'} a BOS token at every block start, "
                f"this tokenizer {'adds' if self.packer.bos is not None else 'adds no'} BOS: resuming would change the data.",
                "Resume with the tokenizer of the original run (a checkpoint from before every block started with BOS cannot "
                "resume exactly: start a new run).",
            )
        self.source.load_state_dict(state["source"])
        self.packer.carry = state["carry"].tolist()
        self.buffer = list(buffer)
        self.epoch_tokens = state["epoch_tokens"]
        self.generator.set_state(state["generator"])
        self._docs = self.source.iter_epoch()
