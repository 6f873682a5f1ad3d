"""The CUDA backend's kernels: their sources (the .cu / .cuh files in sources/), compiled through MLX's
`mx.fast.cuda_kernel`, launches prepared once, and what the device can run.

Every kernel body is compiled with common.cuh (warp and block reductions, the weight-row loads, RoPE and the
single-query attention a decode step shares) in front of its own header. Float constants (EPS, SCALE) are written
into the source as literals: one kernel per value.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

SOURCES = Path(__file__).resolve().parent / "sources"
# MLX's CUDA allocator puts arrays of 8 bytes or less in a pool of managed memory that the host may read (token
# outputs are), where a kernel reads them over PCIe. The position and padding arrays the kernels read every layer are
# kept at 4 int32 (16 bytes, device memory); the kernels read the first entries only.
SMALL_ARRAY = 4


@functools.cache
def source(name: str) -> str:
    """The text of sources/`name`."""
    return (SOURCES / name).read_text(encoding="utf-8")


def on_cuda() -> bool:
    """Whether MLX computes on its CUDA backend here."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available() and mx.default_device() == mx.gpu)


@dataclass(frozen=True)
class Kernel:
    """A kernel's source and signature; called like the mx.fast.cuda_kernel it stands for, which is built at the
    first call (so steps can be built, and their choice checked, where there is no CUDA), once per distinct kernel."""

    name: str
    body: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    header: str
    shared_memory: int

    def __call__(self, **launch) -> list[mx.array]:
        return _compiled(self)(**launch)


def kernel(kind: str, body: str, inputs: tuple[str, ...], outputs: tuple[str, ...] = ("out",), header: str = "",
           shared_memory: int = 0, **constants: float) -> Kernel:
    """The kernel of `body` with common.cuh and `header` in front and `constants` written in as float literals;
    `shared_memory`: bytes of dynamic shared memory a block gets."""
    for name, value in constants.items():
        body = body.replace(name, f"{float(value)!r}f")
    header = source("common.cuh") + header
    digest = hashlib.sha1(f"{body}\0{header}\0{inputs}\0{outputs}\0{shared_memory}".encode()).hexdigest()[:12]
    return Kernel(f"funasr_{kind}_{digest}", body, tuple(inputs), tuple(outputs), header, shared_memory)


@functools.cache
def _compiled(k: Kernel) -> object:
    return mx.fast.cuda_kernel(name=k.name, input_names=list(k.inputs), output_names=list(k.outputs), source=k.body,
                               header=k.header, shared_memory=k.shared_memory)


@dataclass(frozen=True)
class Launch:
    """A kernel with everything but its inputs decided: a step launches the same few shapes in every layer, so
    they are prepared once (Python time per launch is most of a step's host time)."""

    kernel: object
    options: dict

    def __call__(self, *inputs: mx.array) -> mx.array:
        return self.kernel(inputs=list(inputs), **self.options)[0]


@dataclass(frozen=True)
class Launch2(Launch):
    """A Launch whose kernel has two outputs."""

    def __call__(self, *inputs: mx.array) -> list[mx.array]:
        return self.kernel(inputs=list(inputs), **self.options)


def scratch(n: int, dtype=mx.float32) -> mx.array:
    """A one-launch step's scratch buffer of at least n zeros, filled on the device so that MLX allocates device
    memory (host-made arrays and any of 8 bytes or less go to managed memory, where every access of the barrier's
    spin crossed PCIe: 116 ms a step)."""
    return mx.zeros((max(n, 64),), dtype=dtype)


def device_attribute(code: int) -> int | None:
    """A cudaDeviceAttr of the current CUDA device (driver_types.h: 16 SM count, 75 compute capability major, 97
    opt-in shared memory a block), through the CUDA runtime MLX has loaded; None where it cannot be read."""
    try:
        lib = ctypes.CDLL("libcudart.so.13")
        dev, value = ctypes.c_int(0), ctypes.c_int(0)
        if lib.cudaGetDevice(ctypes.byref(dev)) != 0:
            return None
        if lib.cudaDeviceGetAttribute(ctypes.byref(value), code, dev.value) != 0:
            return None
        return value.value if value.value > 0 else None
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Device:
    """What the one-launch steps need to know of the CUDA device: how many blocks can be resident at once (one an
    SM; None where unknown, or on an MPS share of the GPU, whose SM count overstates it), the compute capability's
    major version and the opt-in shared memory a block may have (None: unknown)."""

    resident_blocks: int | None
    major: int | None
    shared_memory: int | None

    @classmethod
    def current(cls) -> Device:
        return cls(resident_blocks(), device_attribute(75), device_attribute(97))


def resident_blocks() -> int | None:
    """A grid of one block per SM, all resident at once (what a grid barrier needs), or None where that cannot be
    known: the SM count unknown, or an MPS share of the GPU (there the SM count overstates how many blocks can be
    resident and the barrier would wait forever)."""
    if os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100").strip() not in ("", "100"):
        return None
    return device_attribute(16)  # cudaDevAttrMultiProcessorCount
