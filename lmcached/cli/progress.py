"""A self-rewriting status line on stderr for long commands, shown only on a terminal.

Scripts and pipes get none of it: stdout keeps the result alone, stderr keeps errors alone.
A hand-rolled line, not `rich`: one line of text is all these commands show, and `rich`
would be a dependency of the daemon's install for it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Redraws at most this often: a check of a million small files must not spend its time drawing.
REDRAW_INTERVAL_S = 0.2
_CLEAR_LINE = "\r\x1b[2K"


class TerminalStatus:
    """Draw ``update(text)`` over the previous text; ``close()`` erases it. Idempotent close."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self._stream, "isatty", lambda: False)())
        self._drawn_at: float | None = None

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # The first update draws at once, so even a short run shows what it is doing.
        if self._drawn_at is not None and now - self._drawn_at < REDRAW_INTERVAL_S:
            return
        self._drawn_at = now
        self._stream.write(_CLEAR_LINE + text[:160])
        self._stream.flush()

    def close(self) -> None:
        if self._drawn_at is not None:
            self._stream.write(_CLEAR_LINE)
            self._stream.flush()
            self._drawn_at = None

    def __enter__(self) -> TerminalStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
