"""The torch-free checkpoint reader (asr.torch_zip) and writer (tools.torch_zip_writer)."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import asr  # noqa: F401  (BLAS preload before mlx)
from asr.errors import CheckpointError
from asr.loading.torch_zip import TensorData, load_state_dict
from tools import torch_zip_writer as tzw
from tools.torch_zip_writer import bf16_bits_to_float32, float32_to_bf16_bits, save_state_dict

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


# --- helpers ---------------------------------------------------------------------------------------------------
def _rand(dtype: str, shape) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bf16_bits(RNG.standard_normal(shape).astype(np.float32))
    if dtype == "bool":
        return RNG.random(shape) < 0.5
    if dtype.startswith("complex"):
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return RNG.standard_normal(shape).astype(dtype)


class _View:
    """A tensor record with arbitrary offset/size/stride, for hand-made checkpoints."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return tzw._REBUILD_TENSOR_V2, self.args


def _write_zip(path: Path, pkl: bytes, records: dict[str, bytes], prefix: str = "archive", skip=()) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in [("data.pkl", pkl), ("byteorder", b"little"), *records.items(), ("version", b"3\n")]:
            if name not in skip:
                tzw._write_record(zf, f"{prefix}/{name}", data)


def _custom_checkpoint(path: Path, storages: dict[str, tuple[str, np.ndarray]], views: dict, **kw) -> None:
    """storages: key -> (torch dtype, flat array); views: name -> (storage key, offset, size, stride[, numel])."""
    recs, st = {}, {}
    for key, (dtype, flat) in storages.items():
        st[key] = (dtype, flat)
        recs[f"data/{key}"] = np.ascontiguousarray(flat).view(np.uint8).tobytes()
    sd = collections.OrderedDict()
    for name, (key, offset, size, stride, *numel) in views.items():
        dtype, flat = st[key]
        storage = tzw._Storage(tzw._DTYPES[dtype][0], key, numel[0] if numel else flat.size)
        sd[name] = _View(storage, offset, size, stride)
    buf = io.BytesIO()
    tzw._TorchPickler(buf, protocol=2).dump({"state_dict": sd})
    _write_zip(path, buf.getvalue(), recs, **kw)


def _data_offsets(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            n, e = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            out[info.filename] = info.header_offset + 30 + n + e
    return out


# --- round trip --------------------------------------------------------------------------------------------------
DTYPES = list(tzw._DTYPES)
SHAPES = [(), (1,), (0,), (0, 3), (3, 0), (5,), (2, 3, 4), (1, 1, 7), (33, 65)]


@pytest.mark.parametrize("wrap_key", ["state_dict", None])
def test_round_trip_all_dtypes_and_shapes(tmp_path, wrap_key):
    tensors = {f"{d}.{i}": (d, _rand(d, s)) for d in DTYPES for i, s in enumerate(SHAPES)}
    path = tmp_path / "model.pt"
    save_state_dict(path, tensors, wrap_key=wrap_key)
    sd = load_state_dict(path)
    assert list(sd) == list(tensors)
    for name, (dtype, arr) in tensors.items():
        t = sd[name]
        assert t.dtype == dtype and t.shape == arr.shape == t.array.shape, name
        assert t.array.dtype == (np.uint16 if dtype == "bfloat16" else arr.dtype), name
        np.testing.assert_array_equal(t.array, arr, err_msg=name)
    # torch lays every record out 64-byte aligned, archive named after the file
    offsets = _data_offsets(path)
    assert all(off % 64 == 0 for off in offsets.values())
    assert "model/data.pkl" in offsets and "model/byteorder" in offsets


def test_non_contiguous_offset_and_shared_storage(tmp_path):
    flat = np.arange(24, dtype=np.float32)
    bits = float32_to_bf16_bits(np.linspace(-2, 2, 10, dtype=np.float32))
    views = {
        "full": ("0", 0, (4, 6), (6, 1)),
        "transposed": ("0", 0, (6, 4), (1, 6)),
        "slice": ("0", 7, (3, 2), (6, 3)),  # base[1:, 1::3] of a 4x6
        "broadcast": ("0", 5, (3, 4), (0, 1)),  # stride 0 (expand)
        "tail": ("0", 20, (4,), (1,)),
        "bf16_strided": ("1", 1, (3,), (3,)),
        "empty_view": ("0", 24, (0, 5), (5, 1)),
    }
    path = tmp_path / "v.pt"
    _custom_checkpoint(path, {"0": ("float32", flat), "1": ("bfloat16", bits)}, views)
    sd = load_state_dict(path)
    base = flat.reshape(4, 6)
    np.testing.assert_array_equal(sd["full"].array, base)
    np.testing.assert_array_equal(sd["transposed"].array, base.T)
    np.testing.assert_array_equal(sd["slice"].array, base[1:, 1::3])
    np.testing.assert_array_equal(sd["broadcast"].array, np.broadcast_to(flat[5:9], (3, 4)))
    np.testing.assert_array_equal(sd["tail"].array, flat[20:])
    np.testing.assert_array_equal(sd["bf16_strided"].array, bits[1::3])
    assert sd["bf16_strided"].dtype == "bfloat16" and sd["empty_view"].shape == (0, 5)
    assert all(t.array.flags.c_contiguous for t in sd.values())


def test_tensor_data_conversions():
    bits = float32_to_bf16_bits(np.array([[1.0, -2.5], [0.15625, 3e38]], np.float32))
    t = TensorData("bfloat16", (2, 2), bits)
    np.testing.assert_array_equal(t.to_float32(), bf16_bits_to_float32(bits))
    m = t.to_mlx()
    assert str(m.dtype) == "mlx.core.bfloat16" and m.shape == (2, 2)
    np.testing.assert_array_equal(np.array(m.astype(__import__("mlx.core").core.float32)), t.to_float32())
    h = TensorData("float16", (3,), np.array([1, 2, 3], np.float16))
    assert h.to_float32().dtype == np.float32 and str(h.to_mlx().dtype) == "mlx.core.float16"


def test_bf16_rounding_literals():
    u = np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0x7F800000,
                  0xFF800000, 0x80000000, 0x00000001, 0x7FC00001, 0xFFFFFFFF], np.uint32)
    want = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F81, 0x7F80, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x7FC0, 0x7FC0]
    assert float32_to_bf16_bits(u.view(np.float32)).tolist() == want
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = every[~np.isnan(bf16_bits_to_float32(every))]
    np.testing.assert_array_equal(float32_to_bf16_bits(bf16_bits_to_float32(finite)), finite)


def test_writer_rejects_mismatched_dtype(tmp_path):
    with pytest.raises(TypeError, match="bfloat16"):
        save_state_dict(tmp_path / "x.pt", {"w": ("bfloat16", np.zeros(2, np.float32))})
    with pytest.raises(ValueError, match="float8"):
        save_state_dict(tmp_path / "x.pt", {"w": ("float8", np.zeros(2, np.uint8))})


# --- hostile pickles ---------------------------------------------------------------------------------------------
def _payloads(sentinel: Path) -> dict[str, tuple[bytes, str]]:
    cmd = f"touch {sentinel}".encode()
    binu = b"X" + struct.pack("<I", len(cmd)) + cmd
    return {
        "global_reduce": (b"cos\nsystem\n(V" + cmd + b"\ntR.", "os.system"),
        "eval": (b"cbuiltins\neval\n(V__import__('os').system('" + cmd + b"')\ntR.", "builtins.eval"),
        "stack_global": (b"\x80\x04\x8c\x02os\x8c\x06system\x93" + binu + b"\x85R.", "os.system"),
        "inst": (b"(V" + cmd + b"\nios\nsystem\n.", "os.system"),
        "obj": (b"(csubprocess\ngetoutput\nV" + cmd + b"\no.", "subprocess.getoutput"),
        "posix": (b"\x80\x02cposix\nsystem\n" + binu + b"\x85R.", "posix.system"),
    }


@pytest.mark.parametrize("kind", ["global_reduce", "eval", "stack_global", "inst", "obj", "posix"])
def test_hostile_pickle_is_refused(tmp_path, kind):
    sentinel = tmp_path / "pwned"
    pkl, name = _payloads(sentinel)[kind]
    path = tmp_path / "evil.pt"
    _write_zip(path, pkl, {})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as ei:
        load_state_dict(path)
    assert str(path) in str(ei.value)
    assert not sentinel.exists()


def test_hostile_payloads_are_live(tmp_path):
    """Control: the payloads above do run under plain pickle, so the test above is meaningful."""
    for kind in _payloads(tmp_path):
        if kind == "posix" and os.name != "posix":
            continue
        sentinel = tmp_path / kind
        pickle.loads(_payloads(sentinel)[kind][0])
        assert sentinel.exists(), kind


def test_hostile_global_hidden_in_a_valid_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_state_dict(path, {"w": ("float32", np.ones(3, np.float32))})
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read("model/data.pkl")
    evil = pkl.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nload\n", 1)
    _write_zip(path, evil, {"data/0": np.ones(3, np.float32).tobytes()}, prefix="model")
    with pytest.raises(CheckpointError, match=r"torch\.load"):
        load_state_dict(path)


def test_build_cannot_mutate_allowed_callables(tmp_path):
    # push the allowed global, then BUILD with slot state {"fn": 1}: would rebind our function object
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnK\x01s\x86b."
    path = tmp_path / "b.pt"
    _write_zip(path, pkl, {})
    with pytest.raises(CheckpointError, match="BUILD"):
        load_state_dict(path)
    save_state_dict(path, {"w": ("float32", np.ones(2, np.float32))})
    assert load_state_dict(path)["w"].shape == (2,)


# --- corrupt / malformed files -------------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    save_state_dict(path, {"enc.w": ("float32", np.arange(12, dtype=np.float32)), "b": ("int64", np.arange(3))})
    return path


def test_truncated_zip(good):
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="good.pt"):
        load_state_dict(good)


def test_corrupted_storage_bytes(good):
    off = _data_offsets(good)["good/data/0"]
    raw = bytearray(good.read_bytes())
    raw[off + 5] ^= 0xFF
    good.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"enc\.w.*CRC|CRC.*enc\.w"):
        load_state_dict(good)


def test_missing_data_pkl(tmp_path):
    path = tmp_path / "m.pt"
    _write_zip(path, b"", {"data/0": b"\0" * 4}, skip=("data.pkl",))
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_state_dict(path)


def test_missing_storage_entry(tmp_path):
    path = tmp_path / "s.pt"
    _custom_checkpoint(path, {"0": ("float32", np.zeros(6, np.float32))}, {"layer.w": ("0", 0, (6,), (1,))})
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read("archive/data.pkl")
    _write_zip(path, pkl, {})
    with pytest.raises(CheckpointError, match=r"layer\.w.*missing"):
        load_state_dict(path)


def test_storage_size_mismatch(tmp_path):
    path = tmp_path / "n.pt"
    _custom_checkpoint(path, {"0": ("float32", np.zeros(6, np.float32))}, {"layer.w": ("0", 0, (6,), (1,), 8)})
    with pytest.raises(CheckpointError, match=r"layer\.w.*24 bytes"):
        load_state_dict(path)


@pytest.mark.parametrize(
    "view",
    [("0", 1, (6,), (1,)), ("0", 0, (3, 3), (3, 1)), ("0", 0, (2, 2), (1, 5)), ("0", -1, (2,), (1,)),
     ("0", 0, (2,), (-1,)), ("0", 7, (0,), (1,)), ("0", 0, (2, 3), (1,))],
    ids=["offset", "size", "stride", "neg-offset", "neg-stride", "empty-offset", "rank"],
)
def test_view_out_of_storage(tmp_path, view):
    path = tmp_path / "o.pt"
    _custom_checkpoint(path, {"0": ("float32", np.zeros(6, np.float32))}, {"bad.view": view})
    with pytest.raises(CheckpointError, match=r"bad\.view"):
        load_state_dict(path)


def test_big_endian_refused(tmp_path, good):
    with zipfile.ZipFile(good) as zf:
        recs = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    path = tmp_path / "be.pt"
    recs["byteorder"] = b"big"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in recs.items():
            zf.writestr(f"archive/{name}", data)
    with pytest.raises(CheckpointError, match="byteorder"):
        load_state_dict(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "x.pt"
    _write_zip(path, pickle.dumps({"state_dict": {"a": 1}}, protocol=2), {})
    with pytest.raises(CheckpointError, match="'a'"):
        load_state_dict(path)
    _write_zip(path, pickle.dumps([1, 2], protocol=2), {})
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict(path)


@pytest.mark.parametrize("what", ["text", "empty", "directory", "missing", "garbage-pickle"])
def test_not_a_checkpoint(tmp_path, what):
    path = tmp_path / "thing.pt"
    if what == "text":
        path.write_text("hello, I am not a zip\n" * 10)
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "directory":
        path.mkdir()
    elif what == "garbage-pickle":
        _write_zip(path, b"\x80\x02}q\x00(X\x01", {})
    with pytest.raises(CheckpointError, match="thing.pt"):
        load_state_dict(path)


# --- cross-check with real torch -------------------------------------------------------------------------------------
_REF_SCRIPT = r"""
import collections, json, sys
import numpy as np, torch

out, ours = sys.argv[1], sys.argv[2]

def raw(t):
    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

# (a) a file written by torch.save
g = torch.Generator().manual_seed(0)
base = torch.randn(4, 6, generator=g)
sd = collections.OrderedDict()
sd["bf16"] = torch.randn(3, 5, generator=g).to(torch.bfloat16)
sd["fp32"] = base
sd["fp16"] = torch.randn(7, generator=g).half()
sd["i64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
sd["view_t"] = base.t()
sd["view_slice"] = base[1:, ::2]
sd["shared_bf16"] = sd["bf16"][1]
sd["scalar"] = torch.tensor(2.5)
sd["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
torch.save({"state_dict": sd}, out + "/torch.pt")
np.savez(out + "/expected.npz", **{k: raw(v.detach()) for k, v in sd.items()})

# bf16 rounding reference
x = np.concatenate([np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 1e3,
                    np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7FC00001, 0xFF800000, 1],
                             np.uint32).view(np.float32)])
np.savez(out + "/bf16.npz", x=x, bits=raw(torch.from_numpy(x).to(torch.bfloat16)))

# (b) a file written by our writer, read by torch's own safe loader
obj = torch.load(ours, weights_only=True)
assert list(obj) == ["state_dict"], list(obj)
loaded = obj["state_dict"]
np.savez(out + "/from_ours.npz", **{k: raw(v) for k, v in loaded.items()})
meta = {k: [str(v.dtype).replace("torch.", ""), list(v.shape), v.is_contiguous()] for k, v in loaded.items()}
json.dump(meta, open(out + "/from_ours.json", "w"))
"""


def _ref_python() -> str | None:
    p = os.environ.get("FUNASR_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
    return p if Path(p).exists() else None


@pytest.mark.skipif(_ref_python() is None, reason="reference python with torch not found "
                    "(.venv-ref/bin/python; set FUNASR_REF_PYTHON)")
def test_cross_check_with_torch(tmp_path):
    ours = {
        "bf16": ("bfloat16", _rand("bfloat16", (3, 5))),
        "fp32": ("float32", _rand("float32", (4, 6))),
        "fp16": ("float16", _rand("float16", (7,))),
        "i64": ("int64", _rand("int64", (3, 4))),
        "i32": ("int32", _rand("int32", (2,))),
        "u8": ("uint8", _rand("uint8", (5,))),
        "flag": ("bool", _rand("bool", (3,))),
        "scalar": ("float32", np.array(2.5, np.float32)),
        "empty": ("bfloat16", np.zeros((0, 3), np.uint16)),
    }
    ours_path = tmp_path / "ours.pt"
    save_state_dict(ours_path, ours)
    proc = subprocess.run([_ref_python(), "-c", _REF_SCRIPT, str(tmp_path), str(ours_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # (a) torch.save -> our reader, exact
    expected = np.load(tmp_path / "expected.npz")
    sd = load_state_dict(tmp_path / "torch.pt")
    assert set(sd) == set(expected.files)
    want_dtypes = {"bf16": "bfloat16", "fp16": "float16", "i64": "int64", "shared_bf16": "bfloat16",
                   "empty": "bfloat16"}
    for k in expected.files:
        assert sd[k].dtype == want_dtypes.get(k, "float32"), k
        assert sd[k].shape == expected[k].shape, k
        np.testing.assert_array_equal(sd[k].array, expected[k], err_msg=k)

    # our writer -> torch.load(weights_only=True), exact
    got, meta = np.load(tmp_path / "from_ours.npz"), json.loads((tmp_path / "from_ours.json").read_text())
    assert list(meta) == list(ours)
    for k, (dtype, arr) in ours.items():
        assert meta[k] == [dtype, list(arr.shape), True], k
        np.testing.assert_array_equal(got[k], arr, err_msg=k)

    # bf16 rounding identical to torch's
    # (NaN: torch's vectorized CPU kernel writes 0xFFFF, its scalar c10 path 0x7FC0 as we do; both are NaN)
    ref = np.load(tmp_path / "bf16.npz")
    mine, nan = float32_to_bf16_bits(ref["x"]), np.isnan(ref["x"])
    np.testing.assert_array_equal(mine[~nan], ref["bits"][~nan])
    assert np.isnan(bf16_bits_to_float32(ref["bits"][nan])).all() and (mine[nan] == 0x7FC0).all()
