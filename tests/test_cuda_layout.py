"""asr.backends.cuda.layout: fp32 linear layers stored [in, out] compute what nn.Linear computes, and replace only
what they should (fp32, unquantized, outside the skipped children); the CUDA backend's audio path uses them."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from asr.backends.cuda import layout as linear_nn
from asr.backends.cuda.layout import LinearNN

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = [nn.Linear(8, 16), nn.Linear(16, 4, bias=False)]
        self.half = nn.Linear(8, 8)
        self.half.set_dtype(mx.bfloat16)
        self.quant = nn.QuantizedLinear(64, 64, bits=8)
        self.llm = nn.Linear(4, 4)

    def __call__(self, x):
        return self.llm(self.audio[1](self.audio[0](x)))


def test_same_outputs_and_only_fp32_unquantized_layers_outside_skip():
    mx.random.seed(0)
    net = _Net()
    x = mx.random.normal((3, 5, 8))
    before = np.array(net(x))
    w0 = np.array(net.audio[0].weight)
    assert linear_nn.use_nn_layout(net, skip=("llm",)) == 2
    assert [type(m) for m in net.audio] == [LinearNN, LinearNN]
    assert type(net.half) is nn.Linear and type(net.quant) is nn.QuantizedLinear and type(net.llm) is nn.Linear
    np.testing.assert_array_equal(np.array(net.audio[0].weight_t), w0.T)
    assert "bias" not in net.audio[1] and "bias" in net.audio[0]
    np.testing.assert_allclose(np.array(net(x)), before, rtol=1e-5, atol=1e-5)
    names = [k for k, _ in tree_flatten(net.parameters())]
    assert "audio.0.weight_t" in names and "audio.0.weight" not in names


@pytest.mark.skipif(not CUDA, reason="MLX's CUDA backend is not available here")
def test_loaded_model_uses_it_on_cuda(tiny_checkpoint):
    import asr

    model = asr.load_model(str(tiny_checkpoint), dtype="float32", runtime=asr.RuntimeOptions(backend="cuda"))
    assert type(model.net.encoder.encoders[0].self_attn.linear_q_k_v) is LinearNN
    assert type(model.net.adaptor.linear1) is LinearNN
    assert type(model.net.llm.model.layers[0].self_attn.q_proj) is nn.Linear


def test_fp32_products_are_reported(monkeypatch, tiny_model):
    """Whether float32 products run in TF32 (MLX's CUDA default) is part of what a result reports: parity with the
    official fp32 numbers needs IEEE products (MLX_ENABLE_TF32=0)."""
    from asr.backends.cuda.env import fp32_products

    on_cuda = tiny_model.runtime.info.device == "gpu (cuda)"
    expected = "tf32" if on_cuda and os.environ.get("MLX_ENABLE_TF32", "1") != "0" else "ieee"
    assert tiny_model.runtime.info.fp32_products == expected
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    assert fp32_products(on_cuda=True) == "tf32" and fp32_products(on_cuda=False) == "ieee"
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert fp32_products(on_cuda=True) == "ieee"
    monkeypatch.delenv("MLX_ENABLE_TF32")
    assert fp32_products(on_cuda=True) == "tf32"
