"""Shared fixtures: test audio, and a tiny random-weight checkpoint in the official layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import asr  # noqa: F401  (preloads OpenBLAS before mlx)

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parent / "data"
AUDIO = TESTDATA / "audio"


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not AUDIO.is_dir():
        pytest.fail(f"test audio not found at {AUDIO}: the repository carries it in tests/data")
    return TESTDATA


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Conversions land in a private cache, never in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("funasr-cache")
    old = os.environ.get("FUNASR_NANO_CACHE")
    os.environ["FUNASR_NANO_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FUNASR_NANO_CACHE", None)
    else:
        os.environ["FUNASR_NANO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model_cache) -> Path:
    """A tiny random checkpoint in the official layout (config.yaml, model.pt, Qwen3-0.6B/, ...)."""
    from tools.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "Fun-ASR-Nano-tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded in float32 (the parity dtype)."""
    return asr.load_model(str(tiny_checkpoint), dtype="float32")
