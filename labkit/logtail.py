"""A server's growing log file: the complete lines written since the last read, the last lines, and
`LogEcho`, which shows them in the notebook while the server starts (progress bars only once done, at
most a screenful). labkit.serve uses it."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def read_new(path: Path, pos: int) -> tuple[list[str], int]:
    """Complete new lines of a growing file from byte offset `pos`; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return [], pos
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", "replace").replace("\r", "\n")
    return [ln for ln in text.split("\n") if ln.strip()], pos + end


def tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` non-empty lines of a log (read from its last 256 KiB), each ending in a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read().decode("utf-8", "replace").replace("\r", "\n")
    except FileNotFoundError:
        return []
    return [ln + "\n" for ln in data.split("\n") if ln.strip()][-n:]


class LogEcho:
    """Echoes the new lines of a log through `write` ("  | " first), at most `max_shown`, counting the rest."""

    def __init__(self, path: Path, write: Callable[[str], None], show: bool = True, max_shown: int = 80):
        self.path, self.write, self.show, self.max_shown = path, write, show, max_shown
        self.pos = self.shown = self.skipped = 0

    def pump(self) -> None:
        """Read what the log gained since the last call and echo it."""
        lines, self.pos = read_new(self.path, self.pos)
        for line in lines:
            if "%|" in line and "100%|" not in line:  # progress bars drawn with \r: only the end
                continue
            if self.show and self.shown < self.max_shown:
                self.write("  | " + line[:200])
                self.shown += 1
            else:
                self.skipped += 1
