"""What the official-code recorders share (tools/reference.py, tools/speaker_reference.py): they run as scripts in
the reference venv (.venv-ref, torch + funasr), so this module imports nothing of the project.

- `to_numpy(tensor)`: a copy on the host (floating tensors as float32);
- `sha256(path)`: of a file's bytes;
- `version_of(module)`: its `__version__`, or "absent";
- `wrap(owner, name, before=None, after=None)`: replaces `owner.name` by a wrapper that calls `before(args, kwargs)`,
  the original, then `after(args, kwargs, out, seconds)` - how the recorders observe functions the official code
  reaches through module globals.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np


def to_numpy(t) -> np.ndarray:
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).numpy().copy()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wrap(owner, name: str, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(args, kwargs)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        if after:
            after(args, kwargs, out, time.perf_counter() - t0)
        return out

    setattr(owner, name, wrapper)


def version_of(module: str) -> str:
    """A module's version, or "absent" (kaldi-native-fbank is only needed where torchaudio is missing)."""
    try:
        return getattr(__import__(module), "__version__", "?")
    except ImportError:
        return "absent"
