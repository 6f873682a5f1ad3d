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


def _padded_prompts(dim: int) -> tuple[mx.array, list[int]]:
    mx.random.seed(3)
    lengths = [37, 12, 25]
    P = max(lengths)
    rows = [mx.random.normal((n, dim)) * 0.5 for n in lengths]
    return mx.stack([mx.pad(r, [(P - n, 0), (0, 0)]) for r, n in zip(rows, lengths, strict=True)]), lengths


def test_prefill_in_chunks_gives_mlx_lm_values(starts, monkeypatch, tiny_model):
    """The LLM's prefill (llm.last_logits) in chunks of layers: the same logits and KV cache as in one graph, and
    mlx-lm's own model call's logits."""
    from mlx_lm.models.cache import BatchKVCache

    from asr import llm as llm_mod

    llm = tiny_model.net.llm
    padded, lengths = _padded_prompts(llm.args.hidden_size)
    B, P = padded.shape[:2]
    dummy = mx.zeros((B, P), dtype=mx.int32)

    def prefill() -> tuple[np.ndarray, np.ndarray]:
        cache = [BatchKVCache([P - n for n in lengths]) for _ in llm.layers]
        logits = llm_mod.last_logits(llm, dummy, cache, padded)
        return np.array(logits), np.array(cache[-1].keys[..., :P, :])

    monkeypatch.setattr(inflight, "BUDGET_BYTES", 0)
    whole, whole_keys = prefill()
    assert starts == []
    monkeypatch.setattr(inflight, "BUDGET_BYTES", 2 * llm_mod.prefill_layer_bytes(llm.args, B, P, padded.dtype))
    chunked, chunked_keys = prefill()
    assert starts == [(B, P, llm.args.hidden_size)] * len(llm.layers)  # after each layer
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked_keys, whole_keys)
    theirs = llm(dummy, cache=[BatchKVCache([P - n for n in lengths]) for _ in llm.layers], input_embeddings=padded)
    np.testing.assert_allclose(whole, np.array(theirs[:, -1:, :]), rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert np.abs(whole).max() > 0.1


def test_prefill_small_batch_is_one_graph():
    """At the default budget one clip's prompt is one graph; a batch of 64 segments is split every layer or two."""
    from mlx_lm.models import qwen3

    from asr import llm as llm_mod

    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                           num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-6, vocab_size=151936,
                           max_position_embeddings=40960, rope_theta=1e6, head_dim=128, tie_word_embeddings=True)
    assert inflight.InFlight(llm_mod.prefill_layer_bytes(args, 1, 150, mx.bfloat16)).every >= 28  # Qwen3-0.6B
    assert inflight.InFlight(llm_mod.prefill_layer_bytes(args, 64, 120, mx.bfloat16)).every <= 2
