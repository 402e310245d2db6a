"""Library code logs (never prints); the CLI shows meddiff's messages on stderr, plain, and keeps stdout for output."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from meddiff.logs import THIRD_PARTY, StderrHandler, configure_logging

SRC = Path(__file__).resolve().parents[1] / "src" / "meddiff"
COMMAND_OUTPUT = {"cli.py", "environment.py"}  # commands whose stdout is their result (`meddiff env` is parsed)


@pytest.fixture
def restored(monkeypatch):
    """Undo configure_logging's changes to the meddiff and third-party loggers after the test."""
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    loggers = [logging.getLogger(name) for name in ("meddiff", *THIRD_PARTY)]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    yield
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def test_no_print_in_library_modules():
    printing = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in COMMAND_OUTPUT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not printing, f"library code prints (log instead): {printing}"


def test_messages_are_plain_lines_on_stderr_warnings_marked(capsys, restored):
    configure_logging()
    log = logging.getLogger("meddiff.some.module")
    log.debug("hidden detail")
    log.info("prepared %d images", 3)
    log.warning("skipped %d of %d images", 1, 4)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["prepared 3 images", "warning: skipped 1 of 4 images"]


def test_verbosity_and_third_party_levels(capsys, restored):
    configure_logging(1)
    logging.getLogger("meddiff.x").debug("detail")
    assert capsys.readouterr().err == "detail\n"
    assert logging.getLogger("diffusers").level == logging.WARNING
    configure_logging(-1)
    logging.getLogger("meddiff.x").info("progress")
    logging.getLogger("meddiff.x").warning("problem")
    assert capsys.readouterr().err == "warning: problem\n"
    assert logging.getLogger("diffusers").level == logging.ERROR
    assert logging.getLogger("accelerate").level == logging.ERROR
    import os

    assert os.environ["DIFFUSERS_VERBOSITY"] == "error"  # for diffusers imported after this call
    configure_logging(2)
    assert logging.getLogger("transformers").level == logging.INFO


def test_configuring_twice_does_not_repeat_lines(capsys, restored):
    configure_logging()
    configure_logging()
    logging.getLogger("meddiff").info("once")
    assert capsys.readouterr().err == "once\n"
    assert sum(isinstance(h, StderrHandler) for h in logging.getLogger("meddiff").handlers) == 1


def test_a_users_own_library_verbosity_is_kept(monkeypatch, restored):
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "debug")
    configure_logging(-1)
    import os

    assert os.environ["DIFFUSERS_VERBOSITY"] == "debug"


def test_cli_logs_library_messages_to_stderr_and_keeps_its_output_on_stdout(tmp_path, capsys, restored):
    from meddiff.cli import main

    (tmp_path / "pneumoniamnist.npz").write_bytes(b"already here")  # no download: the file exists
    assert main(["data", "download", "medmnist", "pneumoniamnist", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("saved ") and "already exists" not in out
    assert err.strip() == f"{tmp_path / 'pneumoniamnist.npz'} already exists"
