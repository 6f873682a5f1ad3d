"""asr.cpu_encoder: the NumPy SAN-M encoder against MLX's (which it replaces on the CPU), its batching, its bf16
products; and asr.cpu_blas, the BLAS calls of the CPU runners on strided views."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from asr import cpu_bf16, cpu_blas, cpu_encoder
from asr.encoder import EncoderConfig, SenseVoiceEncoder

CPU = mx.default_device() == mx.cpu
needs_cpu = pytest.mark.skipif(not CPU, reason="the NumPy encoder runs where MLX computes on the CPU")


def _encoder(seed: int = 0) -> SenseVoiceEncoder:
    """3 + 1 SAN-M layers of the real widths, random weights (a non-zero FSMN and LayerNorm affine)."""
    mx.random.seed(seed)
    enc = SenseVoiceEncoder(EncoderConfig(num_blocks=3, tp_blocks=1))
    for layer in enc.encoders0 + enc.encoders + enc.tp_encoders:
        layer.self_attn.fsmn_weight = mx.random.normal(layer.self_attn.fsmn_weight.shape) * 0.3
        for norm in (layer.norm1, layer.norm2):
            norm.weight = 1 + 0.1 * mx.random.normal(norm.weight.shape)
            norm.bias = 0.1 * mx.random.normal(norm.bias.shape)
    mx.eval(enc.parameters())
    return enc


def _mlx(enc, *args, monkeypatch) -> np.ndarray:
    """The same encoder through MLX's own operations."""
    monkeypatch.setattr(cpu_encoder, "applies", lambda e: False)
    out = np.array(enc(*args))
    monkeypatch.undo()
    return out


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    assert a.shape == b.shape and a.dtype == np.float32
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


@needs_cpu
def test_matches_mlx_encoder(monkeypatch):
    enc = _encoder()
    assert cpu_encoder.applies(enc)
    xs = mx.random.normal((1, 97, 560), key=mx.random.key(1))
    ours = np.array(enc(xs))
    assert enc._numpy_encoder is cpu_encoder.NumpyEncoder.of(enc)  # built once, kept on the encoder
    ref = _mlx(enc, xs, monkeypatch=monkeypatch)
    _close(ours, ref, 1e-5)
    assert np.abs(ref).max() > 1.0  # a real signal, not a collapsed one


@needs_cpu
def test_padded_batch_is_each_utterance_alone(monkeypatch):
    """Each row of a padded batch equals that utterance encoded alone; its padded rows are 0; the valid rows agree
    with MLX's masked batch."""
    enc = _encoder(1)
    lengths = [60, 41, 1]
    xs = mx.random.normal((3, 60, 560), key=mx.random.key(2))
    ours = np.array(enc(xs, mx.array(lengths)))
    ref = _mlx(enc, xs, mx.array(lengths), monkeypatch=monkeypatch)
    for b, n in enumerate(lengths):
        alone = np.array(enc(xs[b: b + 1, :n]))[0]
        assert np.array_equal(ours[b, :n], alone)
        assert not ours[b, n:].any()
        _close(ours[b, :n], ref[b, :n], 1e-5)


@needs_cpu
def test_bf16_products(monkeypatch):
    """cpu_bf16.Linear layers: the NumPy encoder reads their bf16 bits and rounds each input as they do."""
    if not cpu_bf16.available():
        monkeypatch.setattr(cpu_bf16, "available", lambda: True)
    enc = _encoder(2)
    assert cpu_bf16.use_bf16_products(enc) == 4 * 4
    assert cpu_encoder.applies(enc)
    xs = mx.random.normal((1, 50, 560), key=mx.random.key(3))
    ours = np.array(enc(xs))
    assert cpu_encoder.NumpyEncoder.of(enc).layers[0].qkv.weight.dtype == np.uint16
    ref = _mlx(enc, xs, monkeypatch=monkeypatch)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9999  # the same bf16 products, summed in another order


def test_not_used_for_bf16_cast_or_quantized_encoders():
    enc = _encoder(3)
    assert cpu_encoder.applies(enc) == CPU
    enc.set_dtype(mx.bfloat16)
    assert not cpu_encoder.applies(enc)
    enc = _encoder(3)
    nn.quantize(enc, group_size=64, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                and m.weight.shape[1] % 64 == 0)  # all but the first layer's 560-wide qkv
    assert not cpu_encoder.applies(enc)


@pytest.mark.parametrize("blas", [True, False])
def test_gemm_on_strided_views(blas, monkeypatch):
    """Column blocks of wider arrays in and out (leading dimensions), both transposes, alpha and beta; with the
    BLAS, and with NumPy where none is loaded."""
    if not blas:
        monkeypatch.setattr(cpu_blas, "_sgemm", lambda: None)
    rng = np.random.default_rng(4)
    big = rng.standard_normal((7, 30)).astype(np.float32)
    a, bt = big[:, 2:10], big[:, 12:20]  # [7, 8] each, row stride 30
    out = np.zeros((9, 7, 11), np.float32)
    res = out[1, :, 2:9]  # [7, 7] in a [7, 11] block
    before = rng.standard_normal((7, 7)).astype(np.float32)
    res[...] = before
    cpu_blas.gemm(a, bt, res, alpha=0.5, beta=1.0)
    ref = 0.5 * a.astype(np.float64) @ bt.T.astype(np.float64) + before
    assert np.abs(res - ref).max() < 1e-5
    assert not out[0].any() and not out[1, :, :2].any() and not out[1, :, 9:].any()  # nothing written outside
    b = big[:4, 20:27]  # [4, 7] not transposed: [7, 4] @ [4, 7]
    res2 = np.empty((7, 7), np.float32)
    cpu_blas.gemm(big[:, :4], b, res2, trans_b=False)
    assert np.abs(res2 - big[:, :4] @ b).max() < 1e-5
    with pytest.raises(ValueError, match="do not match"):
        cpu_blas.gemm(a, bt[:, :5], res)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_blas.gemm(big[:, ::2][:, :8], bt, np.empty((7, 7), np.float32))


@pytest.mark.parametrize("blas,mkl", [(True, True), (True, False), (False, False)])
def test_linear_each_row_count(blas, mkl, monkeypatch):
    """cpu_blas.linear (the LLM runner's fp32 products): a gemv for one row, one gemv a row for 2-16 rows on
    OpenBLAS (in weight blocks: 40 rows here, so 96 rows are three blocks, the last one short), (w x^T)^T for
    more, and on MKL x w^T for 2-4 rows; each equals the float64 product; a mismatched or non-fp32 weight is
    refused."""
    if not blas:
        monkeypatch.setattr(cpu_blas, "_sgemv", lambda: None)
    monkeypatch.setattr(cpu_blas._blas, "is_mkl", lambda: mkl)
    first_operand: list[tuple[int, ...]] = []
    gemm = cpu_blas.gemm
    monkeypatch.setattr(cpu_blas, "gemm", lambda a, *args, **kw: first_operand.append(a.shape) or gemm(a, *args, **kw))
    monkeypatch.setattr(cpu_blas, "GEMV_BLOCK_BYTES", 4 * 64 * 40)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    for rows in (1, 3, 4, 5, 16, 17, 46):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        out = cpu_blas.linear(x, w)
        assert out.shape == (rows, 96) and out.dtype == np.float32
        assert np.abs(out - x.astype(np.float64) @ w.T.astype(np.float64)).max() < 1e-4
    if blas:  # which form each row count took
        assert first_operand == ([(3, 64), (4, 64)] + [(96, 64)] * 4 if mkl else [(96, 64)] * 2)
    with pytest.raises(ValueError, match="does not match"):
        cpu_blas.linear(x, w[:, :32].copy())
    with pytest.raises(ValueError, match="does not match"):
        cpu_blas.linear(x, w.astype(np.float64))


def _adaptor(seed: int = 4):
    from asr.adaptor import Adaptor, AdaptorConfig

    mx.random.seed(seed)
    ada = Adaptor(AdaptorConfig())  # the released shape: 512 -> 2048 -> 1024, two 8-head blocks
    for block in ada.blocks:
        for norm in (block.norm1, block.norm2):
            norm.weight = 1 + 0.1 * mx.random.normal(norm.weight.shape)
            norm.bias = 0.1 * mx.random.normal(norm.bias.shape)
    mx.eval(ada.parameters())
    return ada


@needs_cpu
def test_adaptor_matches_mlx_alone_and_batched(monkeypatch):
    """asr.cpu_adaptor: one utterance and a padded batch against the MLX adaptor (valid rows; padded rows 0)."""
    from asr import cpu_adaptor

    ada = _adaptor()
    assert cpu_adaptor.applies(ada)
    xs = mx.random.normal((3, 40, 512), key=mx.random.key(6))
    lengths = [40, 23, 1]
    one = np.array(ada(xs[:1]))
    ours = np.array(ada(xs, mx.array(lengths)))
    monkeypatch.setattr(cpu_adaptor, "applies", lambda a: False)
    ref_one = np.array(ada(xs[:1]))
    ref = np.array(ada(xs, mx.array(lengths)))
    monkeypatch.undo()
    _close(one, ref_one, 1e-5)
    assert np.abs(ref_one).max() > 1.0
    for b, n in enumerate(lengths):
        _close(ours[b, :n], ref[b, :n], 1e-5)
        assert not ours[b, n:].any()
    nn.quantize(ada, group_size=64, bits=8)
    assert not cpu_adaptor.applies(ada)


def test_numpy_serial_limits_numpys_openblas_only():
    """While a CPU runner works, NumPy's bundled OpenBLAS runs on one thread and the BLAS asr._blas loaded keeps
    its threads (limiting both made every runner product single-threaded: 124 vs 78 ms a decode token)."""
    import os

    from threadpoolctl import ThreadpoolController

    from asr import _blas

    if not _blas.loaded:
        pytest.skip("no BLAS loaded (asr._blas)")
    loaded = os.path.realpath(_blas.loaded)

    def threads() -> dict[str, tuple[str, int]]:
        return {os.path.realpath(lib.filepath): (lib.internal_api, lib.num_threads)
                for lib in ThreadpoolController().lib_controllers}

    before = threads()
    assert loaded in before  # threadpoolctl sees the loaded BLAS, so a blanket limit would have reached it
    with cpu_blas.numpy_serial():
        during = threads()
    assert during[loaded] == before[loaded]
    others = {p: n for p, (api, n) in during.items() if api == "openblas" and p != loaded}
    assert all(n == 1 for n in others.values())
    assert threads() == before


def test_blas_search_order(tmp_path):
    """asr._blas: MKL first on Intel CPUs (and where the vendor is unknown), the system OpenBLAS first on others
    (AMD Zen 4: MKL's decode step 116 ms against OpenBLAS's 78-85 ms); FUNASR_NANO_BLAS overrides either way."""
    from asr import _blas

    def kinds(order: list[str]) -> list[str]:
        return ["mkl" if "mkl" in p else "system" for p in order]

    intel, amd = _blas.search_order("auto", "GenuineIntel"), _blas.search_order("", "AuthenticAMD")
    assert kinds(intel)[0] == "mkl" and kinds(intel)[-1] == "system"
    assert kinds(amd)[0] == "system" and kinds(amd)[-1] == "mkl" and sorted(amd) == sorted(intel)
    assert kinds(_blas.search_order("auto", None))[0] == "mkl"
    assert kinds(_blas.search_order("MKL", "AuthenticAMD"))[0] == "mkl"
    assert "mkl" not in kinds(_blas.search_order("openblas", "GenuineIntel"))
    assert _blas.search_order(" /opt/My/libblas.so ", "AuthenticAMD") == ["/opt/My/libblas.so"]
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f\n")
    assert _blas.read_cpuinfo(str(info))[0] == "AuthenticAMD"
    assert _blas.read_cpuinfo(str(tmp_path / "missing"))[0] is None
