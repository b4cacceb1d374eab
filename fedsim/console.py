"""What fedsim prints, and how much of the libraries' logging gets through.

By default a run prints only fedsim's own lines: the run header, one line per round, progress bars
on a terminal, and warnings in fedsim's words. Ray, DeepSpeed and transformers log a great deal
that is meant for their own developers (Ray's start-up banner, its C++ core worker's notes,
tokenizer warnings); `--verbose` (the `FEDSIM_VERBOSE` environment variable, which the Ray workers
inherit) lets all of it through for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "FEDSIM_VERBOSE"
"""Set to 1 (by `--verbose`) to let the libraries' own logging through."""


def verbose() -> bool:
    """Whether the libraries' logs are shown (`--verbose`, or FEDSIM_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Show (or hide) the libraries' logs in this process and in the Ray workers it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


@contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Drop what native code (Ray's C++ core worker) writes straight to file descriptor 2 while
    the block runs, unless verbose. Python's own `sys.stderr` is flushed first, and the block
    must write nothing of its own there; keep it short (one call), as every thread's native
    writes are dropped meanwhile. Ray also writes these lines to its session's log files."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
