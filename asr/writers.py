"""Output formats for transcripts: txt, json, srt, vtt."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from .types import TranscriptionResult

FORMATS = ("txt", "json", "srt", "vtt")


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _said(seg) -> str:
    return f"{seg.speaker}: {seg.text.strip()}" if seg.speaker else seg.text.strip()


def joined_text(segments, whole: str | None = None) -> str:
    """The segments' text: one line a turn ('S1: ...') when they carry speakers, else one paragraph (`whole`, the
    result's own text, when given)."""
    if any(s.speaker for s in segments):
        return "\n".join(_said(s) for s in segments if s.text.strip())
    if whole is not None:
        return whole
    return " ".join(s.text.strip() for s in segments if s.text.strip())


def to_txt(result: TranscriptionResult) -> str:
    return joined_text(result.segments, result.text).strip() + "\n"


def to_json(result: TranscriptionResult) -> str:
    return json.dumps(result.model_dump(), ensure_ascii=False, indent=2) + "\n"


def to_srt(result: TranscriptionResult) -> str:
    blocks = []
    for i, seg in enumerate((s for s in result.segments if s.text.strip()), start=1):
        blocks.append(f"{i}\n{_clock(seg.start, ',')} --> {_clock(seg.end, ',')}\n{_said(seg)}\n")
    return "\n".join(blocks)


def to_vtt(result: TranscriptionResult) -> str:
    lines = ["WEBVTT", ""]
    for seg in result.segments:
        if seg.text.strip():
            text = f"<v {seg.speaker}>{seg.text.strip()}" if seg.speaker else seg.text.strip()
            lines += [f"{_clock(seg.start, '.')} --> {_clock(seg.end, '.')}", text, ""]
    return "\n".join(lines)


def render(result: TranscriptionResult, fmt: str) -> str:
    try:
        return {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt}[fmt](result)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}") from None


_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{6}\.tmp$")  # write_atomic's temporary files: .NAME.PID.HEX.tmp


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files that `write_atomic` calls killed midway (SIGKILL, power loss) left under `folder`:
    those whose writing process is gone (or is this one, which has not written yet). Another live process's are
    kept. Returns how many were removed."""
    removed = 0
    for p in Path(folder).rglob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # alive (or reused): not ours to delete
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a reader (or a run killed
    midway) sees the old file or the whole new one, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
