"""The CPU backend (asr.backends.cpu): its NumPy encoder, adaptor and LLM against the reference MLX runners on the same
weights, its BLAS calls on strided views, MKL's bf16 products (NumPy computes the identical products where MKL is
absent, as in CI), and which runner a model gets here."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache

import asr
from asr.backends.cpu import blas, blas_load
from asr.backends.cpu.adaptor import NumpyAdaptor
from asr.backends.cpu.blas import NUMPY, Blas
from asr.backends.cpu.encoder import NumpyEncoder
from asr.backends.cpu.llm import NumpyQwen3, _State
from asr.backends.cpu.runners import CPUAudio, Facts, auto_dtype, bf16_products, llm_runner
from asr.backends.mlx.runners import MLXLLM
from asr.decode.loop import greedy, left_pad
from asr.errors import InvalidOptionError
from asr.model.adaptor import Adaptor, AdaptorConfig
from asr.model.encoder import EncoderConfig, SenseVoiceEncoder
from asr.options import RuntimeOptions

UNBOUNDED = RuntimeOptions(inflight_mb=0, inflight_layers=0)  # the reference runner with no in-flight bound

CPU = mx.default_device() == mx.cpu
needs_cpu = pytest.mark.skipif(not CPU, reason="the CPU backend runs where MLX computes on the CPU")
MLX = RuntimeOptions(backend="mlx")


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    assert a.shape == b.shape and a.dtype == np.float32
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max()


# --- encoder and adaptor ------------------------------------------------------------------------------------------
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


@needs_cpu
def test_encoder_matches_mlx():
    enc = _encoder()
    xs = mx.random.normal((1, 97, 560), key=mx.random.key(1))
    ours = np.array(NumpyEncoder(enc)(xs))
    ref = np.array(enc(xs))
    _close(ours, ref, 1e-5)
    assert np.abs(ref).max() > 1.0  # a real signal, not a collapsed one


@needs_cpu
def test_padded_batch_is_each_utterance_alone():
    """Each row of a padded batch equals that utterance encoded alone; its padded rows are 0; the valid rows agree
    with MLX's masked batch."""
    enc = _encoder(1)
    runner = NumpyEncoder(enc)
    lengths = [60, 41, 1]
    xs = mx.random.normal((3, 60, 560), key=mx.random.key(2))
    ours = np.array(runner(xs, mx.array(lengths)))
    ref = np.array(enc(xs, mx.array(lengths)))
    for b, n in enumerate(lengths):
        alone = np.array(runner(xs[b: b + 1, :n]))[0]
        assert np.array_equal(ours[b, :n], alone)
        assert not ours[b, n:].any()
        _close(ours[b, :n], ref[b, :n], 1e-5)


@needs_cpu
def test_bf16_encoder_products():
    """A bf16 encoder's products: the weights' bf16 bits read zero-copy, each input rounded to bf16 (MKL's product,
    computed by NumPy where MKL is absent); close to the same bf16 weights in fp32 arithmetic."""
    enc = _encoder(2)
    enc.update(tree_map(lambda a: a.astype(mx.bfloat16).astype(mx.float32), enc.parameters()))  # bf16 values
    xs = mx.random.normal((1, 50, 560), key=mx.random.key(3))
    ref = np.array(enc(xs))
    enc.set_dtype(mx.bfloat16)
    runner = NumpyEncoder(enc, blas=Blas.loaded() if blas.bf16_available() else NUMPY)
    assert runner.layers[0].qkv.weight.dtype == np.uint16 and runner.layers[0].qkv.bias.dtype == np.float32
    ours = np.array(runner(xs))
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9999 and np.abs(ours - ref).max() > 0  # the inputs really are rounded


@needs_cpu
def test_adaptor_matches_mlx_alone_and_batched():
    mx.random.seed(4)
    ada = Adaptor(AdaptorConfig())  # the released shape: 512 -> 2048 -> 1024, two 8-head blocks
    for block in ada.blocks:
        for norm in (block.norm1, block.norm2):
            norm.weight = 1 + 0.1 * mx.random.normal(norm.weight.shape)
            norm.bias = 0.1 * mx.random.normal(norm.bias.shape)
    mx.eval(ada.parameters())
    runner = NumpyAdaptor(ada)
    xs = mx.random.normal((3, 40, 512), key=mx.random.key(6))
    lengths = [40, 23, 1]
    _close(np.array(runner(xs[:1])), np.array(ada(xs[:1])), 1e-5)
    assert np.abs(np.array(ada(xs[:1]))).max() > 1.0
    ours, ref = np.array(runner(xs, mx.array(lengths))), np.array(ada(xs, mx.array(lengths)))
    for b, n in enumerate(lengths):
        _close(ours[b, :n], ref[b, :n], 1e-5)
        assert not ours[b, n:].any()


# --- the BLAS calls -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["loaded", "numpy"])
def test_gemm_on_strided_views(library):
    """Column blocks of wider arrays in and out (leading dimensions), both transposes, alpha and beta; through the
    loaded BLAS and through NumPy."""
    lib = Blas.loaded() if library == "loaded" else NUMPY
    rng = np.random.default_rng(4)
    big = rng.standard_normal((7, 30)).astype(np.float32)
    a, bt = big[:, 2:10], big[:, 12:20]  # [7, 8] each, row stride 30
    out = np.zeros((9, 7, 11), np.float32)
    res = out[1, :, 2:9]  # [7, 7] in a [7, 11] block
    before = rng.standard_normal((7, 7)).astype(np.float32)
    res[...] = before
    blas.gemm(a, bt, res, alpha=0.5, beta=1.0, blas=lib)
    ref = 0.5 * a.astype(np.float64) @ bt.T.astype(np.float64) + before
    assert np.abs(res - ref).max() < 1e-5
    assert not out[0].any() and not out[1, :, :2].any() and not out[1, :, 9:].any()  # nothing written outside
    b = big[:4, 20:27]  # [4, 7] not transposed: [7, 4] @ [4, 7]
    res2 = np.empty((7, 7), np.float32)
    blas.gemm(big[:, :4], b, res2, trans_b=False, blas=lib)
    assert np.abs(res2 - big[:, :4] @ b).max() < 1e-5
    with pytest.raises(ValueError, match="do not match"):
        blas.gemm(a, bt[:, :5], res, blas=lib)
    with pytest.raises(ValueError, match="contiguous rows"):
        blas.gemm(big[:, ::2][:, :8], bt, np.empty((7, 7), np.float32), blas=lib)


@pytest.mark.skipif(not blas.available(), reason="needs a loaded BLAS (Debian: libopenblas0-pthread)")
@pytest.mark.parametrize("mkl", [True, False])
def test_linear_each_row_count(mkl):
    """blas.linear (the LLM runner's fp32 products): a gemv for one row, one gemv a row for 2-16 rows on OpenBLAS
    (in weight blocks: 40 rows here, so 96 rows are three blocks, the last one short), (w x^T)^T for more, and on
    MKL x w^T for 2-4 rows; each equals the float64 product; a mismatched or non-fp32 weight is refused."""
    loaded = Blas.loaded()
    shapes: list[tuple[int, int]] = []  # (m, k) of each sgemm call: which operand went first

    def sgemm(*args):
        shapes.append((args[3], args[5]))
        return loaded.sgemm(*args)

    lib = Blas(sgemm=sgemm, sgemv=loaded.sgemv, mkl=mkl)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    for rows in (1, 3, 4, 5, 16, 17, 46):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        out = blas.linear(x, w, block_bytes=4 * 64 * 40, blas=lib)
        assert out.shape == (rows, 96) and out.dtype == np.float32
        assert np.abs(out - x.astype(np.float64) @ w.T.astype(np.float64)).max() < 1e-4
    assert shapes == ([(3, 64), (4, 64)] + [(96, 64)] * 4 if mkl else [(96, 64)] * 2)
    with pytest.raises(ValueError, match="does not match"):
        blas.linear(x, w[:, :32].copy(), blas=lib)
    with pytest.raises(ValueError, match="does not match"):
        blas.linear(x, w.astype(np.float64), blas=lib)


@pytest.mark.skipif(not blas_load.loaded, reason="no BLAS loaded (blas_load)")
def test_numpy_serial_limits_numpys_openblas_only():
    """While a CPU runner works, NumPy's bundled OpenBLAS runs on one thread and the BLAS blas_load loaded keeps
    its threads (limiting both made every runner product single-threaded: 124 vs 78 ms a decode token)."""
    import os

    from threadpoolctl import ThreadpoolController

    loaded = os.path.realpath(blas_load.loaded)

    def threads() -> dict[str, tuple[str, int]]:
        return {os.path.realpath(lib.filepath): (lib.internal_api, lib.num_threads)
                for lib in ThreadpoolController().lib_controllers}

    before = threads()
    assert loaded in before  # threadpoolctl sees the loaded BLAS, so a blanket limit would have reached it
    with blas.numpy_serial():
        during = threads()
    assert during[loaded] == before[loaded]
    others = {p: n for p, (api, n) in during.items() if api == "openblas" and p != loaded}
    assert all(n == 1 for n in others.values())
    assert threads() == before


def test_blas_search_order(tmp_path):
    """blas_load: MKL first on Intel CPUs (and where the vendor is unknown), the system OpenBLAS first on others
    (AMD Zen 4: MKL's decode step 116 ms against OpenBLAS's 78-85 ms); FUNASR_NANO_BLAS overrides either way."""

    def kinds(order: list[str]) -> list[str]:
        return ["mkl" if "mkl" in p else "system" for p in order]

    intel, amd = blas_load.search_order("auto", "GenuineIntel"), blas_load.search_order("", "AuthenticAMD")
    assert kinds(intel)[0] == "mkl" and kinds(intel)[-1] == "system"
    assert kinds(amd)[0] == "system" and kinds(amd)[-1] == "mkl" and sorted(amd) == sorted(intel)
    assert kinds(blas_load.search_order("auto", None))[0] == "mkl"
    assert kinds(blas_load.search_order("MKL", "AuthenticAMD"))[0] == "mkl"
    assert "mkl" not in kinds(blas_load.search_order("openblas", "GenuineIntel"))
    assert blas_load.search_order(" /opt/My/libblas.so ", "AuthenticAMD") == ["/opt/My/libblas.so"]
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f\n")
    assert blas_load.read_cpuinfo(str(info))[0] == "AuthenticAMD"


# --- bf16 products through MKL ------------------------------------------------------------------------------------
def test_bits_round_to_nearest_even_like_mlx():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 20000),
                        # exact ties between two bf16 values (even and odd lower mantissa) and tiny/huge values
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1e-40, -3e38, 0.0], np.float32)])
    ours = blas.to_bits(x)
    ref = np.asarray(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    assert ours.dtype == np.uint16 and (ours == ref).all()
    assert (blas.from_bits(ours) == np.asarray(mx.array(x).astype(mx.bfloat16).astype(mx.float32))).all()


@pytest.mark.parametrize("library", ["loaded", "numpy"])
def test_matmul_is_the_bf16_product(library):
    """x rounded to bf16 times the bf16 weight, fp32 accumulation (MKL's, or NumPy's on the same values); a
    mismatched weight is refused."""
    lib = Blas.loaded() if library == "loaded" else NUMPY
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = blas.to_bits(rng.standard_normal((48, 64)).astype(np.float32))
    ref = blas.from_bits(blas.to_bits(x)).astype(np.float64) @ blas.from_bits(w).astype(np.float64).T
    out = blas.matmul(x, w, lib)
    assert out.shape == (5, 48) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(out - x @ blas.from_bits(w).T).max() > 0  # the input really is rounded to bf16
    with pytest.raises(ValueError, match="does not match"):
        blas.matmul(x, w[:, :32].copy(), lib)


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
    cpu = blas_load.read_cpuinfo(str(info))
    assert blas._cpu_has_bf16(cpu) is has
    assert blas._faster_than_fp32(cpu) is faster


def test_unreadable_cpuinfo_takes_no_bf16(tmp_path):
    assert blas_load.read_cpuinfo(str(tmp_path / "missing")) == (None, set())
    assert not blas._faster_than_fp32(blas_load.read_cpuinfo(str(tmp_path / "missing")))


# --- the LLM runner -----------------------------------------------------------------------------------------------
@pytest.fixture
def prompts(tiny_model):
    mx.random.seed(3)
    dim = tiny_model.net.llm.args.hidden_size
    return left_pad([mx.random.normal((n, dim)) * 0.5 for n in (37, 12, 25)])


def _decode(runner, prompts, n: int = 150) -> list[list[int]]:
    return [o.tokens for o in greedy(runner, *prompts, eos_ids=set(), max_new_tokens=n, repetition_guard=False)]


def _last_logits(runner: NumpyQwen3, x: np.ndarray, pad: list[int]) -> np.ndarray:
    state = _State(x.shape[0], len(runner.layers), runner.layers[0].n_kv, runner.head_dim, np.asarray(pad))
    return runner._mm(runner._forward(state, x), runner.head)


@needs_cpu
def test_prefill_logits_equal_mlx(tiny_model, prompts):
    """The last-position logits of a left-padded batch prefill equal MLX's (fp32, up to summation order)."""
    llm = tiny_model.net.llm
    padded, lengths = prompts
    pad = [padded.shape[1] - n for n in lengths]
    cache = [BatchKVCache(pad) for _ in llm.layers]
    ref = np.array(llm(mx.zeros(padded.shape[:2], dtype=mx.int32), cache=cache, input_embeddings=padded)[:, -1, :])
    ours = _last_logits(NumpyQwen3(llm, "fp32"), np.array(padded), pad)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@needs_cpu
def test_greedy_tokens_equal_mlx_batched_and_alone(tiny_model, prompts):
    """150 steps (the KV cache grows past its first 128 positions), three rows with left padding: NumPy gives
    MLX's tokens, and each row its tokens when decoded alone."""
    llm = tiny_model.net.llm
    ours = _decode(NumpyQwen3(llm, "fp32"), prompts)
    assert all(len(set(t)) > 10 for t in ours), "degenerate tokens make this comparison meaningless"
    assert ours == _decode(MLXLLM(llm, UNBOUNDED), prompts)
    padded, lengths = prompts
    alone = [_decode(NumpyQwen3(llm, "fp32"), left_pad([padded[b, padded.shape[1] - n:]]))[0]
             for b, n in enumerate(lengths)]
    assert alone == ours


class _RoundedInputs(NumpyQwen3):
    """The fp32 runner with each product's input rounded to bf16: what MKL's bf16 products compute."""

    def _mms(self, x, *ws):
        return super()._mms(blas.from_bits(blas.to_bits(x)), *ws)


@needs_cpu
def test_bf16_llm_through_mkl_products(tiny_checkpoint):
    """The bf16 LLM with MKL's products (NumPy's where MKL is absent): weights stay bf16 bits (zero-copy views of
    MLX's); its greedy tokens equal the fp32 runner's on the same (bf16-valued) weights with each product's input
    rounded to bf16, which is what it claims to compute; its prefill logits are close to MLX's own bf16 Qwen3."""
    llm = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", runtime=MLX).net.llm
    runner = NumpyQwen3(llm, "mkl", blas=Blas.loaded() if blas.bf16_available() else NUMPY)
    assert runner.layers[0].wq.dtype == np.uint16 and not runner.layers[0].wq.flags.owndata
    mx.random.seed(4)
    prompts = left_pad([mx.random.normal((n, llm.args.hidden_size)) * 0.5 for n in (30, 11)])
    ours = _decode(runner, prompts, 40)
    assert all(len(set(t)) > 5 for t in ours), "degenerate tokens make this comparison meaningless"
    fp32 = asr.load_model(str(tiny_checkpoint), dtype="float32", runtime=MLX).net.llm
    assert _decode(_RoundedInputs(fp32, "fp32"), prompts, 40) == ours
    x = np.array(prompts[0][:1, -30:])
    logits = _last_logits(runner, x, [0])[0]
    ref = np.array(llm(mx.zeros((1, 30), dtype=mx.int32), input_embeddings=mx.array(x).astype(mx.bfloat16))
                   [0, -1].astype(mx.float32))
    assert float(logits @ ref / np.linalg.norm(logits) / np.linalg.norm(ref)) > 0.999


# --- which runners a model gets here ------------------------------------------------------------------------------
def test_bf16_paths_and_auto_dtype():
    """How a bf16 LLM multiplies for each machine (Numba's gemv kernels, MKL's bf16 products, whether those beat
    fp32) and option; dtype="auto" is bf16 where a bf16 path computes faster than fp32; an explicit path the
    machine lacks is a clear error."""
    cases = [  # (gemv, mkl, mkl preferred) -> (auto products, auto dtype)
        ((True, False, False), ("gemv", "bfloat16")),
        ((True, True, False), ("gemv", "bfloat16")),
        ((True, True, True), ("mkl", "bfloat16")),
        ((False, True, True), ("mkl", "bfloat16")),
        ((False, True, False), ("mkl", "float32")),
        ((False, False, False), (None, "float32")),
    ]
    auto = RuntimeOptions()
    for facts, expected in cases:
        f = Facts(*facts)
        assert (bf16_products("auto", f), auto_dtype("llm", auto, f)) == expected, facts
        # the encoder has no gemv path, and a quantized LLM runs on MLX's CPU kernels: bf16 only through MKL
        assert auto_dtype("encoder", auto, f) == ("bfloat16" if f.mkl_preferred else "float32")
        assert auto_dtype("quantized-llm", auto, f) == "float32"
    assert bf16_products("gemv", Facts(True, True, True)) == "gemv"
    with pytest.raises(InvalidOptionError, match="Numba"):
        bf16_products("gemv", Facts(False, True, True))
    with pytest.raises(InvalidOptionError, match="MKL"):
        bf16_products("mkl", Facts(True, False, False))


@needs_cpu
def test_the_model_gets_the_runners_that_take_its_weights(tiny_checkpoint):
    fp32 = asr.load_model(str(tiny_checkpoint), dtype="float32")
    info = fp32.runtime.info
    assert info.backend == "cpu" and info.device == "cpu" and info.llm == "NumPy + BLAS, fp32"
    assert isinstance(fp32.runtime.audio, CPUAudio) and info.audio.startswith("NumPy + ")
    assert fp32.transcribe(np.zeros(16000, np.float32) + 0.01, max_new_tokens=2).runtime == info
    q8 = asr.load_model(str(tiny_checkpoint), dtype="float32", quantize=8).net
    assert isinstance(llm_runner(q8, RuntimeOptions()), MLXLLM)  # MLX's CPU kernels run quantized products
    bf16 = asr.load_model(str(tiny_checkpoint), dtype="bfloat16", runtime=MLX).net
    assert isinstance(llm_runner(bf16, RuntimeOptions(), Facts(False, False, False)), MLXLLM)
    assert llm_runner(bf16, RuntimeOptions(), Facts(True, False, False)).products == "gemv"
    reference = asr.load_model(str(tiny_checkpoint), dtype="auto", runtime=MLX)
    assert reference.dtype == "float32" and reference.runtime.info.backend == "mlx"
    assert reference.runtime.info.llm == "MLX operations (mlx-lm's Qwen3 step)"
    with pytest.raises(InvalidOptionError, match="backend 'cuda'"):
        asr.load_model(str(tiny_checkpoint), runtime=RuntimeOptions(backend="cuda"))


def test_quantized_layers_are_not_plain():
    enc = _encoder(3)
    nn.quantize(enc, group_size=64, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                and m.weight.shape[1] % 64 == 0)  # all but the first layer's 560-wide qkv
    from asr.backends.cpu.runners import _plain

    assert not _plain(enc, {mx.float32}) and _plain(_encoder(3), {mx.float32})
