"""A quiet console for runs: one line per phase from vlforge, while third-party warnings, log records
and build output (DeepSpeed compiling its ops, gcc) go to the run's log file instead of the terminal.

`VLFORGE_VERBOSE=1` (`vlforge train --verbose`) leaves everything on the console, as it was. Nothing
changes until `install()` is called (the launchers call it), so importing vlforge in a notebook or a
test leaves warnings where Python puts them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, TextIO

VERBOSE_ENV = "VLFORGE_VERBOSE"
# Loggers of the libraries a run imports whose INFO / WARNING records are chatter on a console.
THIRD_PARTY_LOGGERS = ("DeepSpeed", "torch", "timm", "transformers", "huggingface_hub", "accelerate", "peft")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on")


class _RunLog:
    """The log file of this process, and what was said before its path was known."""

    def __init__(self) -> None:
        self.installed = False
        self.path: Path | None = None
        self._file: TextIO | None = None
        self._pending: list[str] = []
        self._handler: logging.Handler | None = None

    def write(self, text: str) -> None:
        if self._file is None:
            self._pending.append(text)
            return
        self._file.write(text)
        self._file.flush()

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._file is not None:
            self._file.close()
        self.path, self._file = path, open(path, "a", encoding="utf-8")
        for text in self._pending:
            self._file.write(text)
        self._pending.clear()
        self._file.flush()


_LOG = _RunLog()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    _LOG.write(warnings.formatwarning(message, category, filename, lineno, line))


class _ToRunLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _LOG.write(self.format(record) + "\n")
        except Exception:  # a log record must never fail the run
            self.handleError(record)


def install() -> None:
    """Send warnings and third-party log records to the run's log (buffered until `attach_log`);
    a no-op with VLFORGE_VERBOSE=1."""
    if verbose() or _LOG.installed:
        return
    _LOG.installed = True
    warnings.showwarning = _show_warning
    _LOG._handler = _ToRunLog()
    _LOG._handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"))
    _route_loggers()


def _route_loggers() -> None:
    """Third-party loggers to the run's log, their console handlers removed. Called again after each
    phase that may import a library: DeepSpeed adds a stdout handler of its own when it is imported."""
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            if isinstance(existing, logging.StreamHandler) and getattr(existing, "stream", None) in (sys.stdout, sys.stderr):
                logger.removeHandler(existing)
        if _LOG._handler not in logger.handlers:
            logger.addHandler(_LOG._handler)
        logger.propagate = False


def attach_log(path: Path) -> Path | None:
    """Where the log of this process goes from now on (what was held back is written first); the path,
    or None when nothing is diverted (verbose, or `install` not called)."""
    if not _LOG.installed:
        return None
    _LOG.attach(path)
    _route_loggers()
    return path


@contextlib.contextmanager
def output_to_log() -> Iterator[None]:
    """Everything this process and its children write to stdout and stderr (compiler lines of a
    DeepSpeed op build, say) goes to the run's log for the duration; nothing is diverted unless
    `install` was called and the log is attached."""
    if not _LOG.installed or _LOG._file is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = _LOG._file.fileno()
    _LOG._file.flush()
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        _route_loggers()
