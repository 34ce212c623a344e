"""llama.cpp's log, captured: the engine's own words for what it did (which buffer held the
weights) and why it failed, kept off the terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines instead of printing them (a line per tensor while quantizing).

    llama-cpp-python's own callback maps ggml's log levels from an older enum and prints
    warnings it means to hide; it is put back afterwards.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
