"""Use an optimised BLAS for MLX's CPU backend on Linux when one is installed.

The `mlx[cpu]` Linux wheel links a bundled reference BLAS (~6 GFLOP/s for sgemm). Loading an optimised BLAS
with RTLD_GLOBAL *before* `mlx.core` is imported makes the dynamic linker resolve MLX's `cblas_*`/LAPACK
symbols to it instead (~30-50x faster matmuls on CPU). This must run before the first `import mlx`;
`asr/__init__.py` calls it first thing.

Search order: Intel MKL from PyPI in this environment (`pip install mkl`, i.e. the `mkl` extra: fast one-row
products and, on Intel CPUs with AMX/AVX512-BF16, bf16 products), then the system OpenBLAS
(Debian/Ubuntu `libopenblas0-pthread`, Fedora, Arch). On other CPUs (AMD) the system OpenBLAS comes first: on an
AMD Zen 4 VM a Qwen3-0.6B fp32 decode step took 116 ms on MKL against 78-85 ms on Debian's OpenBLAS
(docs/performance.md). The CPU runners call the one loaded directly (asr.backends.cpu.blas); MLX's own CPU
matmuls use it too. Nothing here imports MLX.

Control with FUNASR_NANO_BLAS: unset/"auto" (search), "off" (keep the bundled BLAS), "openblas" (skip
MKL), "mkl" (MKL first on any CPU), or a path to a shared library.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_MKL = ("libmkl_rt.so.3", "libmkl_rt.so.2")
_CANDIDATES = (
    # Debian/Ubuntu: libopenblas0-pthread (preferred), libopenblas0-openmp, libopenblas0-serial
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    # Fedora/RHEL/Arch
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def _arch() -> str:
    machine = os.uname().machine
    return {"arm64": "aarch64"}.get(machine, machine)


CPUINFO = "/proc/cpuinfo"
INTEL = "GenuineIntel"


Cpu = tuple[str | None, frozenset[str]]  # vendor_id, flags


def read_cpuinfo(path: str = CPUINFO) -> Cpu:
    """The first CPU's vendor_id (GenuineIntel, AuthenticAMD, ...) and flags (None and no flags where they cannot
    be read)."""
    vendor = None
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    return vendor, frozenset(value.split())
    except OSError:
        pass
    return vendor, frozenset()


@functools.cache
def this_cpu() -> Cpu:
    """read_cpuinfo of this machine, read once."""
    return read_cpuinfo()


def is_mkl() -> bool:
    """Whether the BLAS loaded is Intel MKL."""
    return bool(loaded) and "mkl" in os.path.basename(loaded)


def search_order(choice: str, vendor: str | None) -> list[str]:
    """The libraries `preload` tries, in order, for a FUNASR_NANO_BLAS value and a CPU vendor."""
    c = choice.strip().lower()
    if c and c not in ("auto", "openblas", "mkl"):
        return [choice.strip()]
    system = [p.format(arch=_arch()) for p in _CANDIDATES]
    mkl = [os.path.join(sys.prefix, "lib", name) for name in _MKL]
    if c == "openblas":
        return system
    if c == "mkl" or vendor in (None, INTEL):
        return mkl + system
    return system + mkl


def preload() -> str | None:
    """Load an optimised BLAS globally (Linux only); returns the path loaded, or None."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    choice = os.environ.get("FUNASR_NANO_BLAS", "auto").strip()
    if choice.lower() == "off":
        return None
    if "mlx.core" in sys.modules:
        log.debug("mlx already imported; cannot swap its BLAS any more")
        return None
    paths = search_order(choice, this_cpu()[0])
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # a broken install must not stop the import
            log.warning("could not load BLAS %s: %s", path, exc)
            continue
        loaded = path
        log.debug("MLX CPU backend uses %s", path)
        return path
    if choice.lower() not in ("", "auto", "openblas", "mkl"):
        log.warning("FUNASR_NANO_BLAS=%s was not found; MLX keeps its bundled reference BLAS", choice)
    return None
