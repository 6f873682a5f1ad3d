"""Write PyTorch zip checkpoints (the `torch.save` format) without torch.

The inverse of `asr.torch_zip.load_state_dict`; `torch.load(path, weights_only=True)` reads its output. Used to
build test fixtures and converted checkpoints on machines without torch.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

# torch dtype name -> (storage class in module `torch`, numpy dtype of the raw values). bf16 travels as uint16 bits.
_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float64": ("DoubleStorage", np.dtype("<f8")),
    "float32": ("FloatStorage", np.dtype("<f4")),
    "float16": ("HalfStorage", np.dtype("<f2")),
    "bfloat16": ("BFloat16Storage", np.dtype("<u2")),
    "int64": ("LongStorage", np.dtype("<i8")),
    "int32": ("IntStorage", np.dtype("<i4")),
    "int16": ("ShortStorage", np.dtype("<i2")),
    "int8": ("CharStorage", np.dtype("i1")),
    "uint8": ("ByteStorage", np.dtype("u1")),
    "bool": ("BoolStorage", np.dtype("?")),
    "complex64": ("ComplexFloatStorage", np.dtype("<c8")),
    "complex128": ("ComplexDoubleStorage", np.dtype("<c16")),
}

_ALIGN = 64  # torch aligns every record's data to 64 bytes (caffe2/serialize/inline_container.cc kFieldAlignment)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even, like `.to(torch.bfloat16)`.

    Finite values and infinities match torch bit for bit. NaN becomes 0x7FC0 (c10's scalar rule; torch's
    vectorized CPU kernel writes 0xFFFF instead, also a NaN). Other float dtypes are first converted to float32.
    """
    # ref: c10/util/BFloat16.h::round_to_nearest_even
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)  # 64-bit sum: no wrap-around for NaN payloads
    rounded = ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- pickle side ----------------------------------------------------------------------------------------------
class _Global:
    """A module-level name of torch, emitted as a GLOBAL opcode (torch itself is never imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists on a callable; never called
        raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling")


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    """One object per name, so the pickle memo emits each GLOBAL once (as torch's pickler does)."""
    return _GLOBALS.setdefault((module, name), _Global(module, name))


class _Storage:
    def __init__(self, storage_class: str, key: str, numel: int):
        self.cls, self.key, self.numel = _global("torch", storage_class), key, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    # ref: torch/_tensor.py::Tensor._reduce_ex_internal (dense CPU tensor branch)
    def __reduce__(self):
        args = (self.storage, 0, self.shape, _contiguous_strides(self.shape), False, collections.OrderedDict())
        return _REBUILD_TENSOR_V2, args


_REBUILD_TENSOR_V2 = _global("torch._utils", "_rebuild_tensor_v2")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # ref: c10/core/Contiguity / TensorImpl::empty_tensor_restride (size-0 dims count as 1)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickler that writes `_Global` as GLOBAL and storages as persistent ids, like torch.save."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_torch_global(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = save_torch_global

    # ref: torch/serialization.py::_save.persistent_id
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


# --- zip side -------------------------------------------------------------------------------------------------
def _write_record(zf: zipfile.ZipFile, name: str, data) -> None:
    """Write one stored (uncompressed) entry whose data starts on a 64-byte boundary, padded like torch."""
    view = memoryview(data).cast("B")
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = view.nbytes
    zip64_extra = 20 if view.nbytes * 1.05 > zipfile.ZIP64_LIMIT else 0  # zipfile adds it to the local header
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + zip64_extra + 4
    pad = -start % _ALIGN
    # ref: caffe2/serialize/inline_container.cc::getPadding ("FB" extra field filled with 'Z')
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64_extra > 0) as f:
        if zf.fp.tell() % _ALIGN:
            raise AssertionError(f"record {name} is not {_ALIGN}-byte aligned")
        f.write(view)


# ref: torch/serialization.py::_save
def save_state_dict(path, tensors: dict[str, tuple[str, np.ndarray]], *, wrap_key: str | None = "state_dict") -> None:
    """Write `tensors` ({name: (torch dtype name, raw array)}) as a torch zip checkpoint.

    The pickle is `{wrap_key: OrderedDict(...)}`, or the bare OrderedDict when `wrap_key` is None. bfloat16 values
    are given as np.uint16 bit patterns (see `float32_to_bf16_bits`). Each tensor gets its own contiguous storage.
    """
    path = Path(path)
    storages: list[tuple[str, np.ndarray]] = []
    state = collections.OrderedDict()
    for name, (dtype, array) in tensors.items():
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r} (known: {sorted(_DTYPES)})")
        storage_class, np_dtype = _DTYPES[dtype]
        array = np.asarray(array)
        if array.dtype.newbyteorder("<") != np_dtype.newbyteorder("<"):
            raise TypeError(f"tensor {name!r}: {dtype} needs a numpy {np_dtype} array, got {array.dtype}")
        raw = np.ascontiguousarray(array, dtype=np_dtype)  # little-endian, C order
        key = str(len(storages))
        storages.append((key, raw))
        shape = tuple(int(n) for n in array.shape)
        state[name] = _Tensor(_Storage(storage_class, key, math.prod(shape)), shape)
    obj = state if wrap_key is None else {wrap_key: state}

    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    pkl = buf.getvalue()

    prefix = path.stem or "archive"  # torch names the archive after the file
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_record(zf, f"{prefix}/data.pkl", pkl)
        _write_record(zf, f"{prefix}/.format_version", b"1")
        _write_record(zf, f"{prefix}/.storage_alignment", str(_ALIGN).encode())
        _write_record(zf, f"{prefix}/byteorder", b"little")
        for key, raw in storages:
            _write_record(zf, f"{prefix}/data/{key}", raw.reshape(-1).view(np.uint8))
        _write_record(zf, f"{prefix}/version", b"3\n")
        serialization_id = str(int(hashlib.sha1(pkl).hexdigest(), 16))[:40]  # deterministic, torch's is random
        _write_record(zf, f"{prefix}/.data/serialization_id", serialization_id.encode())
