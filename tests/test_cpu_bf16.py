"""asr.cpu_bf16 (bf16 products through MKL on the CPU) and the bf16 paths built on it: the LLM in asr.cpu_llm and
the encoder's linear layers. Where MKL's bf16 products are not available (CI installs no MKL) the same code runs
with NumPy computing the identical bf16 x bf16 -> fp32 products; the MKL-only test checks MKL against that."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

import asr
from asr import _blas, cpu_bf16, cpu_gemv, cpu_llm
from asr import llm as llm_mod


def test_bits_round_to_nearest_even_like_mlx():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 20000),
                        # exact ties between two bf16 values (even and odd lower mantissa) and tiny/huge values
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-40, -3e38, 0.0], np.float32)])
    ours = cpu_bf16.to_bits(x)
    ref = np.asarray(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    assert ours.dtype == np.uint16 and (ours == ref).all()
    assert (cpu_bf16.from_bits(ours) == np.asarray(mx.array(x).astype(mx.bfloat16).astype(mx.float32))).all()


def test_matmul_is_the_bf16_product():
    """x rounded to bf16 times the bf16 weight, fp32 accumulation; a mismatched weight is refused."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = cpu_bf16.to_bits(rng.standard_normal((48, 64)).astype(np.float32))
    ref = cpu_bf16.from_bits(cpu_bf16.to_bits(x)).astype(np.float64) @ cpu_bf16.from_bits(w).astype(np.float64).T
    out = cpu_bf16.matmul(x, w)
    assert out.shape == (5, 48) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(out - x @ cpu_bf16.from_bits(w).T).max() > 0  # the input really is rounded to bf16
    with pytest.raises(ValueError, match="does not match"):
        cpu_bf16.matmul(x, w[:, :32].copy())


@pytest.mark.skipif(not cpu_bf16.available(), reason="needs MKL (the mkl extra) and a CPU with AVX512-BF16/AMX")
def test_mkl_equals_numpy(monkeypatch):
    rng = np.random.default_rng(2)
    w = cpu_bf16.to_bits(rng.standard_normal((3072, 1024)).astype(np.float32) * 0.02)
    for rows in (1, 46):
        x = rng.standard_normal((rows, 1024)).astype(np.float32)
        mkl = cpu_bf16.matmul(x, w)
        monkeypatch.setattr(cpu_bf16, "_gemm", lambda: None)
        ref = cpu_bf16.matmul(x, w)
        monkeypatch.undo()
        assert np.abs(mkl - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.fixture
def bf16_everywhere(monkeypatch):
    """Take the bf16 paths as if MKL were there (products by NumPy where it is not), ahead of asr.cpu_gemv."""
    if not cpu_bf16.available():
        monkeypatch.setattr(cpu_bf16, "available", lambda: True)
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)


def _greedy(llm, prompts, numpy_on_cpu: bool, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(llm_mod, "NUMPY_ON_CPU", numpy_on_cpu)
    outs = llm_mod.greedy_decode_batch(llm, prompts, eos_ids=set(), max_new_tokens=40, repetition_guard=False)
    return [o.tokens for o in outs]


def test_bf16_llm_runs_in_numpy(tiny_checkpoint, bf16_everywhere, monkeypatch):
    """The bf16 LLM on the NumPy runner: weights stay bf16 bits (zero-copy views of MLX's). Its greedy tokens equal
    the fp32 runner's on the same (bf16-valued) weights with each product's input rounded to bf16, which is what
    the bf16 runner claims to compute; its prefill logits are close to MLX's own bf16 Qwen3 (which also rounds
    every other activation to bf16)."""
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16").net.llm
    assert cpu_llm.applies(llm)
    runner = cpu_llm.NumpyQwen3.of(llm)
    assert runner.layers[0].wq.dtype == np.uint16 and not runner.layers[0].wq.flags.owndata
    mx.random.seed(4)
    prompts = [mx.random.normal((n, llm.args.hidden_size)) * 0.5 for n in (30, 11)]
    ours = _greedy(llm, prompts, True, monkeypatch)
    assert all(len(set(t)) > 5 for t in ours), "degenerate tokens make this comparison meaningless"

    emulated = asr.load_model(str(tiny_checkpoint), dtype="float32").net.llm
    emulated.update(tree_map(lambda a: a.astype(mx.bfloat16).astype(mx.float32), emulated.parameters()))
    fp32_product = cpu_llm._product
    monkeypatch.setattr(cpu_llm, "_product", lambda x, w: fp32_product(cpu_bf16.from_bits(cpu_bf16.to_bits(x)), w))
    assert _greedy(emulated, prompts, True, monkeypatch) == ours
    monkeypatch.setattr(cpu_llm, "_product", fp32_product)

    first = _greedy(llm, prompts, False, monkeypatch)  # MLX's own bf16 path
    assert [t[:2] for t in first] == [t[:2] for t in ours]
    x = np.array(prompts[0][None])
    state = cpu_llm._State(1, len(runner.layers), runner.layers[0].n_kv, runner.head_dim, np.zeros(1, np.int64))
    logits = runner._mm(runner._forward(state, x), runner.head)[0]
    ref = np.array(llm(mx.zeros((1, 30), dtype=mx.int32), input_embeddings=prompts[0][None].astype(mx.bfloat16))
                   [0, -1].astype(mx.float32))
    assert float(logits @ ref / np.linalg.norm(logits) / np.linalg.norm(ref)) > 0.999


def test_bf16_encoder_products(tiny_checkpoint, bf16_everywhere):
    """encoder_dtype=bfloat16 on the CPU: every encoder linear is a cpu_bf16.Linear, the rest of the encoder fp32;
    the encoder's output stays close to the fp32 encoder's, and transcription runs end to end."""
    ref = asr.load_model(str(tiny_checkpoint), dtype="float32")
    model = asr.load_model(str(tiny_checkpoint), dtype="float32", encoder_dtype="bfloat16")
    enc = model.net.encoder
    kinds = {type(m) for _, m in enc.named_modules()}
    assert cpu_bf16.Linear in kinds and nn.Linear not in kinds
    assert enc.tp_norm.weight.dtype == mx.float32
    assert all(m.weight.dtype == mx.bfloat16 for _, m in enc.named_modules() if isinstance(m, cpu_bf16.Linear))
    feats = mx.array(np.random.default_rng(5).standard_normal((40, 560)).astype(np.float32))
    a, b = np.array(model.encode(feats)), np.array(ref.encode(feats))
    assert a.dtype == np.float32 and a.shape == b.shape
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99
    assert np.abs(a - b).max() > 0  # the products really ran in bf16
    out = model.transcribe(np.random.default_rng(6).standard_normal(16000).astype(np.float32) * 0.1,
                           max_new_tokens=5)
    assert isinstance(out.text, str)


def test_linear_matches_rounded_reference(bf16_everywhere):
    rng = np.random.default_rng(7)
    lin = nn.Linear(32, 24)
    layer = cpu_bf16.Linear(lin.weight, lin.bias)
    x = mx.array(rng.standard_normal((2, 3, 32)).astype(np.float32))
    w = np.asarray(lin.weight.astype(mx.bfloat16).astype(mx.float32))
    xr = np.asarray(x.astype(mx.bfloat16).astype(mx.float32))
    ref = xr @ w.T + np.asarray(lin.bias)
    out = np.asarray(layer(x))
    assert out.shape == (2, 3, 24) and np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize(("vendor", "flags", "has", "faster"), [
    ("GenuineIntel", "fpu avx512f avx512_bf16 amx_bf16 amx_tile", True, True),  # Sapphire Rapids
    ("GenuineIntel", "fpu avx512f avx512_bf16", True, True),
    ("AuthenticAMD", "fpu avx512f avx512_bf16 avx512_vnni", True, False),  # Zen 4: MKL's bf16 slower than fp32
    ("GenuineIntel", "fpu avx2 avx512f", False, False),
])
def test_which_cpus_take_bf16(tmp_path, vendor, flags, has, faster):
    """Both cores listed, as /proc/cpuinfo does; only the first core's vendor and flags are read."""
    core = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\nflags\t\t: {flags}\n\n"
    info = tmp_path / "cpuinfo"
    info.write_text(core + core.replace("processor\t: 0", "processor\t: 1"))
    cpu = _blas.read_cpuinfo(str(info))
    assert cpu_bf16._cpu_has_bf16(cpu) is has
    assert cpu_bf16._faster_than_fp32(cpu) is faster


def test_unreadable_cpuinfo_takes_no_bf16(tmp_path):
    assert _blas.read_cpuinfo(str(tmp_path / "missing")) == (None, set())
    assert not cpu_bf16._faster_than_fp32(_blas.read_cpuinfo(str(tmp_path / "missing")))
