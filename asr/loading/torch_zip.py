"""Read PyTorch zip checkpoints (`torch.save` format) without torch, executing no pickled code.

A `torch.save` file is a zip archive:

    <prefix>/data.pkl      pickle (protocol 2) of the saved object; tensors refer to storages by persistent id
    <prefix>/data/<key>    raw little-endian bytes of one storage
    <prefix>/byteorder     b"little" (absent in old files, which are little-endian)
    <prefix>/version       format version

`data.pkl` is read with a restricted unpickler: `find_class` resolves only the handful of globals a plain state
dict uses, mapped to our own harmless functions, and `persistent_load` maps storage records to zip entries read on
demand. Any other global raises `CheckpointError`; nothing from the file is ever called.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError

# torch storage class name -> (torch dtype name, numpy dtype). bf16 is kept as raw uint16 bits.
_STORAGE_TYPES: dict[str, tuple[str, np.dtype]] = {
    "DoubleStorage": ("float64", np.dtype("<f8")),
    "FloatStorage": ("float32", np.dtype("<f4")),
    "HalfStorage": ("float16", np.dtype("<f2")),
    "BFloat16Storage": ("bfloat16", np.dtype("<u2")),
    "LongStorage": ("int64", np.dtype("<i8")),
    "IntStorage": ("int32", np.dtype("<i4")),
    "ShortStorage": ("int16", np.dtype("<i2")),
    "CharStorage": ("int8", np.dtype("i1")),
    "ByteStorage": ("uint8", np.dtype("u1")),
    "BoolStorage": ("bool", np.dtype("?")),
    "ComplexFloatStorage": ("complex64", np.dtype("<c8")),
    "ComplexDoubleStorage": ("complex128", np.dtype("<c16")),
}

_MAX_PICKLE_BYTES = 256 << 20  # a state dict's data.pkl is ~100 KB; refuse absurd ones before reading
_READ_CHUNK = 64 << 20
_MAX_EXPANSION = 2  # tensors may add up to at most this many times the file's size (1x when stored, as torch does)


@dataclass
class TensorData:
    """One tensor of a checkpoint: torch dtype name, shape, and values (bf16 as raw uint16 bits)."""

    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray

    def to_float32(self) -> np.ndarray:
        if self.dtype == "bfloat16":
            return bf16_bits_to_float32(self.array)
        return self.array.astype(np.float32)

    def to_mlx(self):
        import mlx.core as mx  # lazy: `asr` must be imported before mlx (BLAS preload)

        if self.dtype == "bfloat16":
            return mx.array(self.array).view(mx.bfloat16)
        return mx.array(self.array)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bfloat16 bit patterns (uint16) to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- objects the restricted unpickler builds instead of torch objects ----------------------------------------
class _Frozen:
    """Objects handed to the unpickler refuse BUILD, so a pickle cannot rewrite their attributes."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__} is not allowed")


class _StorageType(_Frozen):
    """Stand-in for a `torch.<X>Storage` class: only carries the dtype."""

    __slots__ = ("name", "dtype", "np_dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.np_dtype = _STORAGE_TYPES[name]


class _Storage(_Frozen):
    """One `<prefix>/data/<key>` entry; read once, on first use."""

    __slots__ = ("reader", "key", "stype", "numel", "_data")

    def __init__(self, reader: _ZipReader, key: str, stype: _StorageType, numel: int):
        self.reader, self.key, self.stype, self.numel = reader, key, stype, numel
        self._data: np.ndarray | None = None

    def data(self, tensor_key: str) -> np.ndarray:
        if self._data is None:
            self._data = self.reader.read_storage(self.key, self.stype.np_dtype, self.numel, tensor_key)
        return self._data


class _TensorRecord(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD on a tensor is not allowed")


def _int_tuple(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(type(x) is int for x in v):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints, got {v!r:.80}")
    return tuple(v)


class _Callable(_Frozen):
    """A module-level function wrapped so that BUILD cannot mutate it (e.g. its `__defaults__`)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


# ref: torch/_utils.py::_rebuild_tensor_v2
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: first argument is not a storage record")
    if type(storage_offset) is not int:
        raise pickle.UnpicklingError("_rebuild_tensor_v2: storage offset is not an int")
    if metadata:
        raise pickle.UnpicklingError("_rebuild_tensor_v2: tensors with extra metadata are not supported")
    return _TensorRecord(storage, storage_offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"))


# ref: torch/_utils.py::_rebuild_parameter (a Parameter pickles as its data tensor)
def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRecord):
        raise pickle.UnpicklingError("_rebuild_parameter: data is not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict (ref: torch/_weights_only_unpickler.py, narrower)."""

    def __init__(self, data: bytes, reader: _ZipReader):
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self.reader.path}: data.pkl references the forbidden global '{module}.{name}'; only plain "
            "tensor state dicts can be loaded (nothing was executed)"
        )

    # ref: torch/serialization.py::_load.persistent_load
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.120}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {pid!r:.120}")
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(self.reader, key, stype, numel)
        elif st.stype.dtype != stype.dtype or st.numel != numel:
            raise pickle.UnpicklingError(f"storage '{key}' is referenced with two different types or sizes")
        return st


class _ZipReader:
    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        names = zf.namelist()
        if not names:
            raise CheckpointError(f"{path}: empty zip archive, not a torch checkpoint")
        # ref: caffe2/serialize/inline_container.cc: the archive name is the first record's top directory
        self.prefix = names[0].split("/", 1)[0]
        self.names = set(names)
        self.archive_bytes = path.stat().st_size
        self.storage_bytes = 0  # bytes of storages read so far

    def record(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def read_small(self, name: str, limit: int) -> bytes:
        info = self.zf.getinfo(self.record(name))
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {self.record(name)} is {info.file_size} bytes (limit {limit})")
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read {self.record(name)}: {e}") from e

    def read_storage(self, key: str, dtype: np.dtype, numel: int, tensor_key: str) -> np.ndarray:
        name = self.record(f"data/{key}")
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self.path}: storage entry '{name}' of tensor '{tensor_key}' is missing"
            ) from None
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{self.path}: storage '{name}' of tensor '{tensor_key}' holds {info.file_size} bytes, "
                f"expected {numel} x {dtype.itemsize} = {nbytes}"
            )
        # torch.save stores tensors uncompressed, so they cannot add up to more than the file: a compressed entry
        # (a zip bomb) or a lying size is refused before its bytes are allocated
        self.storage_bytes += nbytes
        if self.storage_bytes > _MAX_EXPANSION * self.archive_bytes + (1 << 20):
            raise CheckpointError(
                f"{self.path}: storage '{name}' of tensor '{tensor_key}' would take the tensors to "
                f"{self.storage_bytes:,} bytes, more than the {self.archive_bytes:,}-byte file can hold (a compressed "
                "'zip bomb' or a corrupt size); torch checkpoints store tensors uncompressed"
            )
        out = np.empty(nbytes, dtype=np.uint8)  # the only copy: zip entry -> array, in bounded chunks
        try:
            with self.zf.open(info) as f:
                pos = 0
                while pos < nbytes:
                    chunk = f.read(min(_READ_CHUNK, nbytes - pos))
                    if not chunk:
                        break
                    out[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                    pos += len(chunk)
                f.read(1)  # reach EOF so zipfile verifies the CRC
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot read storage '{name}' of tensor '{tensor_key}': {e}") from e
        if pos != nbytes:
            raise CheckpointError(f"{self.path}: storage '{name}' of tensor '{tensor_key}' is truncated")
        return out.view(dtype)


def _materialize(rec: _TensorRecord, key: str, path: Path) -> TensorData:
    st = rec.storage
    size, stride, offset = rec.size, rec.stride, rec.offset
    if len(size) != len(stride):
        raise CheckpointError(f"{path}: tensor '{key}': size {size} and stride {stride} differ in length")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise CheckpointError(f"{path}: tensor '{key}': negative size/stride/offset ({size}, {stride}, {offset})")
    numel = math.prod(size)
    if numel == 0:
        if offset > st.numel:
            raise CheckpointError(f"{path}: tensor '{key}': offset {offset} beyond storage of {st.numel}")
        return TensorData(st.stype.dtype, size, np.empty(size, dtype=st.stype.np_dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= st.numel:
        raise CheckpointError(
            f"{path}: tensor '{key}': offset {offset}, size {size}, stride {stride} reach element {last} "
            f"of a storage of {st.numel} elements"
        )
    base = st.data(key)
    contiguous = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        contiguous[i] = contiguous[i + 1] * size[i + 1]
    if all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous, strict=True)):
        arr = base[offset : offset + numel].reshape(size)  # a view: no copy for contiguous tensors
    else:
        isz = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=[s * isz for s in stride], writeable=False
        )
        arr = np.ascontiguousarray(view)
    return TensorData(st.stype.dtype, size, arr)


# ref: torch/serialization.py::_load (zip format only; the pre-1.6 legacy format is refused)
def load_state_dict(path, *, key: str | None = "state_dict") -> dict[str, TensorData]:
    """Load the tensors of a `torch.save` zip checkpoint, without torch and without running pickled code.

    Accepts `{key: {name: tensor}}` (FunASR's `model.pt`) or a bare `{name: tensor}` dict. Raises
    `CheckpointError` for anything unsafe, corrupt, truncated or not a plain state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (expected a torch .pt checkpoint)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint ({e}); the file is truncated/corrupt, or uses the pre-1.6 "
            "legacy format (re-save it with a recent torch)"
        ) from e
    with zf:
        reader = _ZipReader(path, zf)
        if reader.record("data.pkl") not in reader.names:
            raise CheckpointError(f"{path}: '{reader.record('data.pkl')}' is missing; not a torch checkpoint")
        if reader.record("byteorder") in reader.names:
            order = reader.read_small("byteorder", 64)
            if order != b"little":
                raise CheckpointError(f"{path}: byteorder {order!r} is not supported (only little-endian)")
        try:
            obj = _RestrictedUnpickler(reader.read_small("data.pkl", _MAX_PICKLE_BYTES), reader).load()
        except CheckpointError:
            raise
        except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, BadZipFile ...
            raise CheckpointError(f"{path}: cannot unpickle data.pkl: {type(e).__name__}: {e}") from e

        if isinstance(obj, dict) and key is not None and isinstance(obj.get(key), dict):
            sd = obj[key]
        elif isinstance(obj, dict) and obj and all(isinstance(v, _TensorRecord) for v in obj.values()):
            sd = obj
        else:
            top = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: no state dict under key {key!r} and not a bare tensor dict (top: {top})")

        out: dict[str, TensorData] = {}
        for name, rec in sd.items():
            if not isinstance(name, str) or not isinstance(rec, _TensorRecord):
                raise CheckpointError(f"{path}: state dict entry {name!r} is not a tensor")
            out[name] = _materialize(rec, name, path)
        return out
