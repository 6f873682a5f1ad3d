"""asr.backends.mlx.inflight: the encoder and the LLM's prefill hand a large batch's graph to the device in chunks of
layers (so that a GPU does not hold every layer's intermediates at once), with the same values as one lazy graph;
small batches are not split."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3
from mlx_lm.models.cache import BatchKVCache

from asr.backends.mlx.inflight import InFlight
from asr.decode.loop import left_pad
from asr.model.encoder import EncoderConfig, SenseVoiceEncoder
from asr.model.llm import lm_head, prefill_last, prefill_layer_bytes


class Recording(InFlight):
    """InFlight that records the shape of every graph it hands to the device."""

    def __init__(self, layer_bytes: int, budget: int):
        super().__init__(layer_bytes, budget)
        self.started: list[tuple[int, ...]] = []

    def hand_over(self, x: mx.array) -> None:
        self.started.append(x.shape)
        super().hand_over(x)


def test_chunk_size_follows_the_budget():
    assert InFlight(384 << 20, budget=1 << 30).every == 1  # two layers already fill the budget
    assert InFlight(6 << 20, budget=1 << 30).every == 85
    assert InFlight(6 << 20, budget=0).every == 0  # no bound
    assert InFlight(0, budget=1 << 30).every == 1 << 29  # nothing to bound: never reached
    # RuntimeOptions.inflight_layers caps a chunk's layers whatever their estimated size
    assert InFlight(6 << 20, budget=1 << 30, max_layers=16).every == 16
    assert InFlight(6 << 20, budget=0, max_layers=8).every == 8
    assert InFlight(384 << 20, budget=1 << 30, max_layers=16).every == 1


def test_inflight_layers_option_reaches_the_runners(tiny_checkpoint):
    """RuntimeOptions(inflight_layers=) is checked, reaches the reference runners, and changes when, not what."""
    import pytest

    import asr
    from asr.errors import InvalidOptionError

    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(InvalidOptionError, match="inflight_layers"):
            asr.RuntimeOptions(inflight_layers=bad)
    assert asr.RuntimeOptions().inflight_layers == 16
    assert asr.RuntimeOptions.from_env({"FUNASR_NANO_INFLIGHT_LAYERS": "0"}).inflight_layers == 0
    with pytest.raises(InvalidOptionError, match="FUNASR_NANO_INFLIGHT_LAYERS='x' is not a whole number of layers"):
        asr.RuntimeOptions.from_env({"FUNASR_NANO_INFLIGHT_LAYERS": "x"})
    clip = np.random.default_rng(0).uniform(-0.1, 0.1, 24000).astype(np.float32)
    texts = []
    for layers in (0, 1):
        m = asr.load_model(str(tiny_checkpoint), dtype="float32",
                           runtime=asr.RuntimeOptions(backend="mlx", inflight_layers=layers))
        assert m.runtime.audio.options.inflight_layers == m.runtime.llm.options.inflight_layers == layers
        texts.append(m.transcribe(clip, vad=False, max_new_tokens=6, repetition_guard=False).segments[0].token_ids)
    assert texts[0] == texts[1] and len(texts[0]) == 6


def _encoder() -> SenseVoiceEncoder:
    mx.random.seed(3)
    enc = SenseVoiceEncoder(EncoderConfig(num_blocks=3, tp_blocks=2))
    mx.eval(enc.parameters())
    return enc


def test_encoder_in_chunks_gives_the_same_values():
    enc = _encoder()
    xs = mx.random.normal((3, 41, 560), key=mx.random.key(1))
    lengths = mx.array([41, 30, 12])
    unbounded = Recording(enc.layer_bytes(3, 41, mx.float32), budget=0)
    whole = np.array(enc(xs, lengths, each_layer=unbounded))
    assert unbounded.started == []
    per_layer = Recording(enc.layer_bytes(3, 41, mx.float32), budget=2 * enc.layer_bytes(3, 41, mx.float32))
    chunked = np.array(enc(xs, lengths, each_layer=per_layer))
    assert per_layer.started == [(3, 41, 512)] * 5  # after each of the 3 + 2 layers
    np.testing.assert_array_equal(chunked, whole)
    assert np.abs(whole).max() > 0.1


def test_encoder_small_batch_is_one_graph():
    """At the default budget (1 GB) a batch of a few 10 s segments fits whole: nothing is split."""
    enc = _encoder()
    bound = Recording(enc.layer_bytes(4, 170, mx.float32), budget=1 << 30)
    mx.eval(enc(mx.random.normal((4, 170, 560), key=mx.random.key(2)), mx.array([170, 160, 150, 10]),
                each_layer=bound))
    assert bound.started == []
    assert InFlight(enc.layer_bytes(64, 183, mx.float32), 1 << 30).every == 1  # 64 segments: every layer


def test_prefill_in_chunks_gives_mlx_lm_values(tiny_model):
    """The LLM's prefill (asr.model.llm.prefill_last) in chunks of layers: the same logits and KV cache as in one
    graph, and mlx-lm's own model call's logits."""
    llm = tiny_model.net.llm
    mx.random.seed(3)
    padded, lengths = left_pad([mx.random.normal((n, llm.args.hidden_size)) * 0.5 for n in (37, 12, 25)])
    B, P = padded.shape[:2]
    layer_bytes = prefill_layer_bytes(llm.args, B, P, padded.dtype)

    def prefill(bound: InFlight) -> tuple[np.ndarray, np.ndarray]:
        cache = [BatchKVCache([P - n for n in lengths]) for _ in llm.layers]
        logits = lm_head(llm, prefill_last(llm, cache, padded, each_layer=bound))
        return np.array(logits), np.array(cache[-1].keys[..., :P, :])

    unbounded, per_layer = Recording(layer_bytes, 0), Recording(layer_bytes, 2 * layer_bytes)
    whole, whole_keys = prefill(unbounded)
    assert unbounded.started == []
    chunked, chunked_keys = prefill(per_layer)
    assert per_layer.started == [(B, P, llm.args.hidden_size)] * len(llm.layers)  # after each layer
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked_keys, whole_keys)
    cache = [BatchKVCache([P - n for n in lengths]) for _ in llm.layers]
    theirs = llm(mx.zeros((B, P), dtype=mx.int32), cache=cache, input_embeddings=padded)
    np.testing.assert_allclose(whole, np.array(theirs[:, -1:, :]), rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert np.abs(whole).max() > 0.1


def test_prefill_small_batch_is_one_graph():
    """At the default budget one clip's prompt is one graph; a batch of 64 segments is split every layer or two."""
    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                           num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-6, vocab_size=151936,
                           max_position_embeddings=40960, rope_theta=1e6, head_dim=128, tie_word_embeddings=True)
    assert InFlight(prefill_layer_bytes(args, 1, 150, mx.bfloat16), 1 << 30).every >= 28  # Qwen3-0.6B
    assert InFlight(prefill_layer_bytes(args, 64, 120, mx.bfloat16), 1 << 30).every <= 2
