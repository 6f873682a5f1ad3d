"""asr.cpu_llm (the CPU's NumPy/BLAS runner for the fp32 LLM) against MLX's own Qwen3 on the same weights."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache

from asr import cpu_bf16, cpu_gemv, cpu_llm
from asr import llm as llm_mod


@pytest.fixture
def prompts(tiny_model):
    mx.random.seed(3)
    dim = tiny_model.net.llm.args.hidden_size
    return [mx.random.normal((n, dim)) * 0.5 for n in (37, 12, 25)]


def _decode(model, prompts, numpy_on_cpu: bool, monkeypatch, n: int = 150):
    monkeypatch.setattr(llm_mod, "NUMPY_ON_CPU", numpy_on_cpu)
    outs = llm_mod.greedy_decode_batch(model, prompts, eos_ids=set(), max_new_tokens=n, repetition_guard=False)
    return [o.tokens for o in outs]


def test_runs_for_fp32_and_bf16_on_the_cpu_only(tiny_model, tiny_checkpoint, monkeypatch):
    import asr

    assert mx.default_device() == mx.cpu
    assert cpu_llm.applies(tiny_model.net.llm) and cpu_llm.fp32_arithmetic(tiny_model.net.llm)
    # bf16 where asr.cpu_gemv (tests/test_cpu_gemv.py) or MKL's bf16 products (tests/test_cpu_bf16.py) are
    bf16 = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    assert cpu_llm.applies(bf16) == (cpu_llm.bf16_products() is not None)
    assert cpu_llm.fp32_arithmetic(bf16) == (cpu_llm.bf16_products() == "gemv")
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    assert cpu_llm.applies(bf16) == cpu_bf16.available()
    assert not cpu_llm.fp32_arithmetic(bf16)
    assert not cpu_llm.applies(asr.load_model(str(tiny_checkpoint), dtype="float32", quantize=8).net.llm)


def test_prefill_logits_equal_mlx(tiny_model, prompts):
    """The last-position logits of a left-padded batch prefill equal MLX's (fp32, up to summation order)."""
    llm = tiny_model.net.llm
    lengths = [p.shape[0] for p in prompts]
    P = max(lengths)
    pad = [P - n for n in lengths]
    padded = mx.stack([mx.pad(p, [(P - n, 0), (0, 0)]) for p, n in zip(prompts, lengths, strict=True)])
    ref = llm_mod.last_logits(llm, mx.zeros((3, P), dtype=mx.int32), [BatchKVCache(pad) for _ in llm.layers], padded)
    runner = cpu_llm.NumpyQwen3.of(llm)
    state = cpu_llm._State(3, len(runner.layers), runner.layers[0].n_kv, runner.head_dim, np.asarray(pad))
    ours = runner._mm(runner._forward(state, np.array(padded)), runner.head)
    ref = np.array(ref[:, -1, :])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_tokens_equal_mlx_batched_and_alone(tiny_model, prompts, monkeypatch):
    """150 steps (the KV cache grows past its first 128 positions), three rows with left padding: NumPy gives
    MLX's tokens, and each row its tokens when decoded alone."""
    llm = tiny_model.net.llm
    ours = _decode(llm, prompts, True, monkeypatch)
    theirs = _decode(llm, prompts, False, monkeypatch)
    assert all(len(set(t)) > 10 for t in ours), "degenerate tokens make this comparison meaningless"
    assert ours == theirs
    assert [_decode(llm, [p], True, monkeypatch)[0] for p in prompts] == ours


def test_transcribe_uses_it_and_agrees(tiny_model, testdata, monkeypatch):
    clip = str(testdata / "audio" / "en" / "jfk.wav")
    calls = []
    real = cpu_llm.NumpyQwen3.start
    monkeypatch.setattr(cpu_llm.NumpyQwen3, "start", lambda self, *a: calls.append(1) or real(self, *a))
    ours = tiny_model.transcribe(clip, max_new_tokens=40, vad=False, repetition_guard=False)
    assert calls
    monkeypatch.setattr(llm_mod, "NUMPY_ON_CPU", False)
    theirs = tiny_model.transcribe(clip, max_new_tokens=40, vad=False, repetition_guard=False)
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) == 40


def test_device_specific_paths_stay_off_here(monkeypatch):
    """On this CPU-only MLX the CUDA decode steps are never chosen; MLX's CUDA graph-size default is only set
    when MLX's CUDA build is installed, and never over the user's own value."""
    from importlib import metadata

    from asr import _mlx_env, cuda_decode

    assert not cuda_decode._on_cuda()

    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "placeholder")  # so that teardown restores the real state
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    installed: set[str] = set()

    def version(dist):
        if dist in installed:
            return "0.32.4"
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(_mlx_env.metadata, "version", version)
    _mlx_env.apply_defaults()
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ
    installed.add("mlx-cuda-13")
    _mlx_env.apply_defaults()
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == _mlx_env.CUDA_OPS_PER_BUFFER
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "7")
    _mlx_env.apply_defaults()
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "7"


def test_server_status_names_the_runner(tiny_model, tiny_checkpoint):
    import asr
    from server.worker import _compute

    assert _compute(tiny_model).startswith("cpu (") and "LLM: NumPy BLAS" in _compute(tiny_model)
    assert "encoder: NumPy + BLAS (asr/cpu_encoder.py)" in _compute(tiny_model)
    bf16 = _compute(asr.load_model(str(tiny_checkpoint), dtype="bfloat16"))
    expected = {"mkl": "LLM: NumPy + MKL bf16", "gemv": "LLM: NumPy, bf16 weights x fp32"}
    kind = cpu_llm.bf16_products()
    assert (expected[kind] in bf16) if kind else ("LLM: NumPy" not in bf16)
    assert "encoder: NumPy + BLAS" in bf16  # the encoder stays fp32 (encoder_dtype's default)
    assert "NumPy" not in _compute(object())
