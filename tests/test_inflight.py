"""asr.inflight: the encoder hands a large batch's graph to the device in chunks of layers (so that
a GPU does not hold every layer's intermediates at once), with the same values as one lazy graph; small batches
are not split."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from asr import cpu_encoder, inflight
from asr.encoder import EncoderConfig, SenseVoiceEncoder


def test_chunk_size_follows_the_budget():
    assert inflight.InFlight(384 << 20, budget=1 << 30).every == 1  # two layers already fill the budget
    assert inflight.InFlight(6 << 20, budget=1 << 30).every == 85
    assert inflight.InFlight(6 << 20, budget=0).every == 0  # no bound
    assert inflight.InFlight(0, budget=1 << 30).every == 1 << 29  # nothing to bound: never reached


@pytest.fixture
def starts(monkeypatch):
    """The arrays InFlight hands to the device (mx.async_eval calls), recorded."""
    seen: list[tuple[int, ...]] = []
    real = mx.async_eval

    def spy(*arrays):
        seen.extend(a.shape for a in arrays)
        return real(*arrays)

    monkeypatch.setattr(inflight.mx, "async_eval", spy)
    monkeypatch.setattr(cpu_encoder, "applies", lambda e: False)  # MLX's own operations, as on a GPU
    return seen


def _encoder() -> SenseVoiceEncoder:
    mx.random.seed(3)
    enc = SenseVoiceEncoder(EncoderConfig(num_blocks=3, tp_blocks=2))
    mx.eval(enc.parameters())
    return enc


def test_encoder_in_chunks_gives_the_same_values(starts, monkeypatch):
    enc = _encoder()
    xs = mx.random.normal((3, 41, 560), key=mx.random.key(1))
    lengths = mx.array([41, 30, 12])
    monkeypatch.setattr(inflight, "BUDGET_BYTES", 0)
    whole = np.array(enc(xs, lengths))
    assert starts == []
    monkeypatch.setattr(inflight, "BUDGET_BYTES", 2 * enc.layer_bytes(3, 41, mx.float32))  # a chunk per layer
    chunked = np.array(enc(xs, lengths))
    assert starts == [(3, 41, 512)] * 5  # after each of the 3 + 2 layers
    np.testing.assert_array_equal(chunked, whole)
    assert np.abs(whole).max() > 0.1


def test_encoder_small_batch_is_one_graph(starts):
    """At the default budget a batch of a few 10 s segments fits the budget whole: nothing is split."""
    enc = _encoder()
    mx.eval(enc(mx.random.normal((4, 170, 560), key=mx.random.key(2)), mx.array([170, 160, 150, 10])))
    assert starts == []
    assert inflight.InFlight(enc.layer_bytes(64, 183, mx.float32)).every == 1  # 64 segments: every layer
