"""Reproduce `asr/assets/silero_vad_16k.safetensors` (+ its licence) from the silero-vad wheel.

Source of truth: the official 16 kHz ONNX graph `silero_vad/data/silero_vad_16k_op15.onnx` of the
silero-vad 6.2.3 wheel (MIT). Its 15 initializers (PyTorch names and layouts, float32) are copied
byte for byte into a safetensors file; nothing is converted. We do not use the wheel's own
`silero_vad_16k.safetensors`: its tensors differ from the official JIT/ONNX models (a VAD built from
it disagrees with them by up to ~0.6 in probability; upstream snakers4/silero-vad#768).

The wheel is fetched with `pip download --no-deps` (never installed: it hard-depends on torch); the
wheel, the ONNX member and the written asset are all checked against pinned sha256 digests. Needs
only the standard library (the ONNX protobuf is read with a small wire-format reader).

    python -m tools.fetch_silero_weights                 # download silero-vad==6.2.3, write assets
    python -m tools.fetch_silero_weights --wheel PATH    # use a local silero_vad-6.2.3 wheel
    python -m tools.fetch_silero_weights --check         # only verify the committed assets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

VERSION = "6.2.3"
WHEEL_NAME = f"silero_vad-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"
MEMBER_ONNX_16K = "silero_vad/data/silero_vad_16k_op15.onnx"
ONNX_16K_SHA256 = "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"
MEMBER_ONNX = "silero_vad/data/silero_vad.onnx"  # the default official model (parity reference in tests)
ONNX_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
MEMBER_LICENSE = f"silero_vad-{VERSION}.dist-info/licenses/LICENSE"
ASSET_SHA256 = "95a868deb27cd97f6298b41ba17ef9fcb5d6b42580697cd976a9738819e0e6ba"

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "asr" / "assets"
WEIGHTS_OUT = ASSETS / "silero_vad_16k.safetensors"
LICENSE_OUT = ASSETS / "SILERO_VAD_LICENSE"
CACHE = Path(os.environ.get("SILERO_VAD_CACHE", ROOT / ".cache" / f"silero-vad-{VERSION}"))

# the 16 kHz network: name -> shape, in graph order (checked against the ONNX initializers)
TENSORS = {
    "model.stft.forward_basis_buffer": (258, 1, 256),
    "model.encoder.0.reparam_conv.weight": (128, 129, 3),
    "model.encoder.0.reparam_conv.bias": (128,),
    "model.encoder.1.reparam_conv.weight": (64, 128, 3),
    "model.encoder.1.reparam_conv.bias": (64,),
    "model.encoder.2.reparam_conv.weight": (64, 64, 3),
    "model.encoder.2.reparam_conv.bias": (64,),
    "model.encoder.3.reparam_conv.weight": (128, 64, 3),
    "model.encoder.3.reparam_conv.bias": (128,),
    "model.decoder.rnn.weight_ih": (512, 128),
    "model.decoder.rnn.weight_hh": (512, 128),
    "model.decoder.rnn.bias_ih": (512,),
    "model.decoder.rnn.bias_hh": (512,),
    "model.decoder.decoder.2.weight": (1, 128, 1),
    "model.decoder.decoder.2.bias": (1,),
}

LICENSE_HEADER = f"""\
silero_vad_16k.safetensors in this directory holds the 15 float32 weight tensors of the official
Silero VAD v6 16 kHz model, copied byte for byte (names and layouts unchanged) from
{MEMBER_ONNX_16K} of the silero-vad {VERSION} wheel on PyPI
(https://github.com/snakers4/silero-vad; wheel sha256 {WHEEL_SHA256}).
Regenerate it with `python -m tools.fetch_silero_weights`.
The Silero VAD model is distributed under the following licence, reproduced from the wheel:

"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- protobuf wire format (just enough of onnx.proto: ModelProto.graph -> GraphProto.initializer) ---
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of one message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def onnx_initializers(model: bytes) -> dict[str, tuple[tuple[int, ...], bytes]]:
    """Top-level float32 initializers of an ONNX model: name -> (shape, little-endian raw bytes)."""
    graph = next(v for f, w, v in _fields(model) if f == 7 and w == 2)  # ModelProto.graph
    out = {}
    for field, wire, tensor in _fields(graph):
        if field != 5 or wire != 2:  # GraphProto.initializer
            continue
        dims: list[int] = []
        name, dtype, raw = "", None, None
        for f, w, v in _fields(tensor):
            if f == 1 and w == 0:
                dims.append(v)
            elif f == 1 and w == 2:  # packed dims
                j = 0
                while j < len(v):
                    d, j = _varint(v, j)
                    dims.append(d)
            elif f == 2:
                dtype = v
            elif f == 8:
                name = v.decode()
            elif f == 9:
                raw = bytes(v)
        if dtype != 1 or raw is None:  # 1 = FLOAT, stored as raw_data
            raise ValueError(f"initializer {name!r}: expected float32 raw_data (data_type {dtype})")
        out[name] = (tuple(dims), raw)
    return out


def safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], bytes]], metadata: dict[str, str]) -> bytes:
    """Serialise float32 tensors (raw little-endian bytes) as a safetensors file, in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(raw for _, raw in tensors.values())


# --- wheel ------------------------------------------------------------------------------------------
def download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"silero-vad=={VERSION}", "-d", str(dest)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)  # noqa: S603 - fixed argument list
    return dest / WHEEL_NAME


def read_member(wheel: Path, member: str, expected_sha256: str | None) -> bytes:
    got = sha256(wheel.read_bytes())
    if got != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {got} != expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise SystemExit(f"{member}: sha256 {sha256(data)} != expected {expected_sha256}")
    return data


def official_onnx(cache: Path = CACHE, download: bool = True) -> Path:
    """Path of the official `silero_vad.onnx` (16/8 kHz), extracted from the wheel into `cache`."""
    path = cache / "silero_vad.onnx"
    if path.is_file() and sha256(path.read_bytes()) == ONNX_SHA256:
        return path
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        if not download:
            raise FileNotFoundError(wheel)
        download_wheel(cache)
    path.write_bytes(read_member(wheel, MEMBER_ONNX, ONNX_SHA256))
    return path


def build_assets(wheel: Path) -> tuple[bytes, str]:
    """Return (safetensors bytes, licence file text) built from the wheel, all digests verified."""
    inits = onnx_initializers(read_member(wheel, MEMBER_ONNX_16K, ONNX_16K_SHA256))
    if set(inits) != set(TENSORS):
        raise SystemExit(f"unexpected initializers in {MEMBER_ONNX_16K}: {sorted(set(inits) ^ set(TENSORS))}")
    for name, shape in TENSORS.items():
        if inits[name][0] != shape:
            raise SystemExit(f"{name}: shape {inits[name][0]} != expected {shape}")
    meta = {"source": f"silero-vad {VERSION} wheel, {MEMBER_ONNX_16K}", "license": "MIT"}
    weights = safetensors_bytes({n: inits[n] for n in TENSORS}, meta)
    if sha256(weights) != ASSET_SHA256:
        raise SystemExit(f"built asset sha256 {sha256(weights)} != expected {ASSET_SHA256}")
    licence = read_member(wheel, MEMBER_LICENSE, None).decode("utf-8")
    if "MIT License" not in licence or "Copyright" not in licence:
        raise SystemExit(f"{MEMBER_LICENSE} is not the expected MIT licence text")
    return weights, LICENSE_HEADER + licence.rstrip("\n") + "\n"


def check() -> bool:
    ok = WEIGHTS_OUT.is_file() and sha256(WEIGHTS_OUT.read_bytes()) == ASSET_SHA256
    ok = ok and LICENSE_OUT.is_file() and "MIT License" in LICENSE_OUT.read_text(encoding="utf-8")
    print(f"{WEIGHTS_OUT}: {'ok' if ok else 'MISSING OR MODIFIED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help=f"use this local {WHEEL_NAME} instead of downloading it")
    ap.add_argument("--check", action="store_true", help="only verify the assets already in asr/assets")
    args = ap.parse_args(argv)
    if args.check:
        return 0 if check() else 1
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        weights, licence = build_assets(wheel)
    ASSETS.mkdir(parents=True, exist_ok=True)
    WEIGHTS_OUT.write_bytes(weights)
    LICENSE_OUT.write_text(licence, encoding="utf-8")
    print(f"wrote {WEIGHTS_OUT} ({len(weights)} bytes, sha256 {ASSET_SHA256})")
    print(f"wrote {LICENSE_OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
