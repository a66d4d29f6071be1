"""Logging: the console keeps its look, train.log gets every line with its time and module, and
every process but the main one is quiet at INFO."""

from __future__ import annotations

import logging

from npt import logs


def test_main_process_logs_info_to_the_console_and_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    logs.configure("info", tmp_path / "train.log")
    log = logging.getLogger("npt.train")
    log.info("step 10/100 | loss 0.5")
    log.info("a\nb")
    log.info("| table |", extra={"plain": True})
    log.error("bad flag")
    out, err = capsys.readouterr()
    assert out == "[npt] step 10/100 | loss 0.5\n[npt] a\n[npt] b\n| table |\n"
    assert err == "error: bad flag\n"
    text = (tmp_path / "train.log").read_text()
    assert " INFO npt.train: step 10/100 | loss 0.5" in text and " ERROR npt.train: bad flag" in text


def test_other_processes_are_quiet_at_info_and_write_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logs.configure("info", tmp_path / "train.log")
    log = logging.getLogger("npt.checkpoint")
    log.info("saved")
    log.warning("skipping checkpoint step-00000004: damaged")
    assert capsys.readouterr().out == "[npt] skipping checkpoint step-00000004: damaged\n"
    assert not (tmp_path / "train.log").exists()


def test_log_level_warning_hides_info_and_a_second_configure_replaces_the_handlers(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    logs.configure("info")
    logs.configure("warning")
    log = logging.getLogger("npt.teachers")
    log.info("Building the teacher")
    log.warning("careful")
    assert capsys.readouterr().out == "[npt] careful\n"  # once: the first configure's handler is gone
    logs.configure("info")
