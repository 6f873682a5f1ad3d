"""Transcript files written next to the audio or into a chosen folder: atomically, never over an existing file.

Each file is written to a hidden temporary name in the target folder (through the folder's one opened descriptor),
flushed, then linked to its final name with link(2), which fails rather than replace a file that exists: then
"name (2).srt", "name (3).srt", ... are tried. A reader never sees a half-written transcript, and nothing the user
had is overwritten.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path

from asr.types import TranscriptionResult
from asr.writers import FORMATS, render

MAX_SUFFIX = 1000


def safe_stem(name: str) -> str:
    """A file name stem from an audio's name or a URL's last path part: no folders, no control characters."""
    stem = Path(name.replace("\\", "/").rsplit("/", 1)[-1]).stem or "transcript"
    stem = re.sub(r"[\x00-\x1f\x7f/:*?\"<>|]", "_", stem).strip(" .") or "transcript"
    return stem[:120]


def write_transcripts(dir_fd: int, folder: Path, stem: str, result: TranscriptionResult,
                      formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write `result` as stem.<fmt> for each format into the folder open at `dir_fd`; returns the paths written."""
    written = []
    for fmt in formats:
        data = render(result, fmt).encode("utf-8")
        tmp = f".{stem}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                     0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            for n in range(1, MAX_SUFFIX + 1):
                name = f"{stem}.{fmt}" if n == 1 else f"{stem} ({n}).{fmt}"
                try:
                    os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    continue
                written.append(folder / name)
                break
            else:
                raise OSError(errno.EEXIST, f"{stem}.{fmt} and {MAX_SUFFIX - 1} numbered variants all exist")
        finally:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
    return written


def estimate_tokens(text: str) -> float:
    """About how many LLM tokens `text` takes in an assistant's context: one per CJK/kana/hangul character, one per
    four other characters (English prose runs ~4 characters a token in common tokenizers)."""
    wide = sum(1 for ch in text if ch >= "\u2e80")
    return wide + (len(text) - wide) / 4
