"""Handing memory the process has freed back to the operating system.

glibc's malloc keeps what a program frees for reuse by later allocations, and blocks below its mmap
threshold (which rises to the size of the largest block freed so far, up to 32 MiB) come from heaps
that only shrink from their top. A program that frees many blocks of a few megabytes while it
allocates others keeps the freed pages resident: its memory grows while what it holds shrinks.
Quantizing a model layer by layer does this (each layer's float weight and float32 temporaries
freed, its int8 weight kept).
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the C library the process runs on
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_trim = _malloc_trim()


def can_return_freed_memory() -> bool:
    """Whether the C library can hand free pages back (glibc; not macOS's or musl's)."""
    return _trim is not None


def return_freed_memory() -> None:
    """Hand every whole free page of the C allocator's heaps back to the operating system (glibc's
    `malloc_trim(0)`); nothing where the C library has no such call."""
    if _trim is not None:
        _trim(0)
