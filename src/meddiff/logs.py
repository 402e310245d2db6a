"""How meddiff's messages reach the user.

Library modules log through `logging.getLogger(__name__)` and never print; they show nothing below WARNING until
an application configures logging. The command line calls `configure_logging` once: meddiff's messages go to
stderr as plain lines ("warning: ..." for warnings), stdout stays for each command's own output, and the
libraries underneath (diffusers, transformers, accelerate, ...) only speak up about problems.
"""

from __future__ import annotations

import logging
import os
import sys

#: Loggers of the libraries meddiff builds on; at the default verbosity they show warnings and errors only.
THIRD_PARTY = (
    "accelerate",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "peft",
    "torch",
    "PIL",
    "matplotlib",
    "urllib3",
    "httpx",
    "gradio",
    "monai",
    "radiomics",
)
#: diffusers and transformers set their own level when first imported unless these (documented) variables say.
_LIBRARY_VERBOSITY_VARIABLES = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")
_set_here: dict[str, str] = {}  # the values configure_logging wrote (others are a user's)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is logged (redirections and test capture included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns its stream; the current sys.stderr is always used
        pass


class PlainFormatter(logging.Formatter):
    """The message alone for information; "warning: " / "error: " in front of problems."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message


def meddiff_level(verbosity: int) -> int:
    """-1 or less: problems only; 0: progress summaries; 1 or more: also debugging detail."""
    return logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG


def third_party_level(verbosity: int) -> int:
    """-1 or less: errors only; 0 and 1: warnings; 2 or more: their information too."""
    return logging.ERROR if verbosity < 0 else logging.WARNING if verbosity < 2 else logging.INFO


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """Show meddiff's messages on stderr at `verbosity`; calling it again replaces the earlier set-up."""
    logger = logging.getLogger("meddiff")
    for handler in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(meddiff_level(verbosity))
    others = third_party_level(verbosity)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(others)
    for variable in _LIBRARY_VERBOSITY_VARIABLES:  # effective even if diffusers/transformers are imported later
        if os.environ.get(variable) in (None, _set_here.get(variable)):  # a user's own setting wins
            os.environ[variable] = _set_here[variable] = logging.getLevelName(others).lower()
    return logger
