"""Hostile checkpoints through `load_model`, the CLI and the MCP server: refused with a clear error, no code run.

tests/test_torch_zip.py covers the restricted unpickler on bare zip files, and tests/test_model.py the first
broken-directory cases (half a model.pt, `../../etc`, a mismatched dimension, a missing tensor). Here complete
model directories carry the payloads, config files try to escape or to make the loader build millions of layers,
model.pt is a zip bomb, and the converted MLX directory is tampered with.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import anyio
import numpy as np
import pytest
import yaml
from mcp import Client

import asr
from asr.errors import CheckpointError, ModelLoadError
from asr.loading import checkpoint as ckpt
from server.app import create_server
from server.config import Settings
from server.schemas import StatusOutput
from tests.test_server_support import JFK, REPO
from tests.test_torch_zip import _payloads, _write_zip
from tools import torch_zip_writer as tzw


def clone(src: Path, dst: Path) -> Path:
    """A model directory like `src`: small files copied, big ones symlinked (so each case costs nothing)."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_dir():
            clone(item, dst / item.name)
        elif item.stat().st_size > 1 << 20:
            (dst / item.name).symlink_to(item)
        else:
            shutil.copy2(item, dst / item.name)
    return dst


def refused(path: Path, match: str, exc: type[Exception] = CheckpointError) -> str:
    with pytest.raises(exc, match=match) as info:
        asr.load_model(str(path), dtype="float32")
    message = str(info.value)
    assert len(message) > 40
    return message


def _replace_model_pt(d: Path, data: bytes) -> None:
    (d / "model.pt").unlink()
    (d / "model.pt").write_bytes(data)


def _evil_zip(tmp_path: Path, kind: str, sentinel: Path) -> bytes:
    pkl, _ = _payloads(sentinel)[kind]
    path = tmp_path / f"{kind}.pt"
    _write_zip(path, pkl, {})
    return path.read_bytes()


# --- code execution ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["global_reduce", "eval", "stack_global", "inst", "obj", "posix"])
def test_pickle_payload_in_a_complete_model_dir(tiny_checkpoint, tmp_path, kind):
    sentinel = tmp_path / "pwned"
    d = clone(tiny_checkpoint, tmp_path / "evil")
    _replace_model_pt(d, _evil_zip(tmp_path, kind, sentinel))
    message = refused(d, "forbidden global")
    assert "nothing was executed" in message and str(d / "model.pt") in message
    assert not sentinel.exists()
    assert not ckpt.converted_dir_for(d).exists()


def test_payload_hidden_among_the_real_tensors(tiny_checkpoint, tmp_path):
    """The genuine data.pkl with one rebuild call swapped for os.system: the first forbidden global stops it."""
    d = clone(tiny_checkpoint, tmp_path / "evil")
    with zipfile.ZipFile(tiny_checkpoint / "model.pt") as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    prefix = next(iter(records)).split("/", 1)[0]
    pkl = records[f"{prefix}/data.pkl"]
    assert b"ctorch._utils\n_rebuild_tensor_v2\n" in pkl
    records[f"{prefix}/data.pkl"] = pkl.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cos\nsystem\n", 1)
    (d / "model.pt").unlink()
    with zipfile.ZipFile(d / "model.pt", "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    refused(d, r"forbidden global 'os\.system'")


@pytest.mark.anyio
async def test_payload_through_the_cli_and_the_mcp_server(tiny_checkpoint, tmp_path, capsys):
    from asr.cli import main

    sentinel = tmp_path / "pwned"
    d = clone(tiny_checkpoint, tmp_path / "evil")
    _replace_model_pt(d, _evil_zip(tmp_path, "global_reduce", sentinel))

    assert main(["transcribe", str(JFK), "-m", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "forbidden global 'os.system'" in err and "Traceback" not in err

    server = create_server(Settings(model=str(d), allowed_roots=[JFK.parent], warmup=False))
    with anyio.fail_after(60):
        async with Client(server, mode="legacy") as client:
            result = await client.call_tool("transcribe_file", {"path": str(JFK)})
            assert result.is_error
            text = result.content[0].text
            assert "could not be loaded" in text and "forbidden global" in text
            status = StatusOutput.model_validate((await client.call_tool("server_status", {})).structured_content)
            assert status.model_state == "failed" and "os.system" in status.model_error
    assert not sentinel.exists()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_yaml_cannot_run_code(tiny_checkpoint, tmp_path):
    sentinel = tmp_path / "pwned"
    d = clone(tiny_checkpoint, tmp_path / "tag")
    (d / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {sentinel}']\n")
    refused(d, "cannot parse")
    (d / "config.yaml").write_text(f"!!python/object/new:os.system ['touch {sentinel}']\n")
    refused(d, "cannot parse")
    assert not sentinel.exists()


def test_yaml_billion_laughs(tiny_checkpoint, tmp_path):
    """Aliases nested 30 levels deep (9**30 strings if expanded) are refused without being expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 30)]
    config = yaml.safe_load((tiny_checkpoint / "config.yaml").read_text())
    for key in ("frontend_conf", "audio_encoder_conf", "llm_conf", "audio_adaptor_conf"):
        d = clone(tiny_checkpoint, tmp_path / key)
        body = yaml.safe_dump({k: v for k, v in config.items() if k != key})
        (d / "config.yaml").write_text("\n".join(lines) + "\n" + body + f"{key}: *l29\n")
        refused(d, "config.yaml")


# --- the config escapes or declares absurd sizes --------------------------------------------------------------------
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_llm_dir_outside_the_model_dir(tiny_checkpoint, tmp_path, where):
    outside = clone(tiny_checkpoint / "Qwen3-0.6B", tmp_path / "elsewhere" / "Qwen3-0.6B")
    d = clone(tiny_checkpoint, tmp_path / "model")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    if where == "absolute":
        cfg["llm_conf"]["init_param_path"] = str(outside)
    elif where == "dotdot":
        cfg["llm_conf"]["init_param_path"] = "../elsewhere/Qwen3-0.6B"
    else:
        shutil.rmtree(d / "Qwen3-0.6B")
        (d / "Qwen3-0.6B").symlink_to(outside)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(d, "outside the model directory")


ABSURD = {  # (file, key path, value): each would otherwise build millions of modules or overflow MLX
    "llm-layers": ("json", ["num_hidden_layers"], 10**6),
    "llm-width": ("json", ["hidden_size"], 2**40),
    "llm-vocab": ("json", ["vocab_size"], 10**12),
    "llm-heads": ("json", ["num_attention_heads"], 0),
    "llm-layers-string": ("json", ["num_hidden_layers"], "28; rm -rf /"),
    "llm-layers-float": ("json", ["num_hidden_layers"], 1e300),
    "encoder-blocks": ("yaml", ["audio_encoder_conf", "num_blocks"], 10**6),
    "encoder-blocks-inf": ("yaml", ["audio_encoder_conf", "num_blocks"], float("inf")),
    "encoder-width-negative": ("yaml", ["audio_encoder_conf", "output_size"], -64),
    "adaptor-layers": ("yaml", ["audio_adaptor_conf", "n_layer"], 10**7),
    "ctc-vocab": ("yaml", ["ctc_vocab_size"], 2**40),
    "mels": ("yaml", ["frontend_conf", "n_mels"], 10**9),
    "frame": ("yaml", ["frontend_conf", "frame_length"], 1e12),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_sizes_are_refused_before_building(tiny_checkpoint, tmp_path, case):
    kind, keys, value = ABSURD[case]
    d = clone(tiny_checkpoint, tmp_path / case)
    path = d / ("Qwen3-0.6B/config.json" if kind == "json" else "config.yaml")
    cfg = json.loads(path.read_text()) if kind == "json" else yaml.safe_load(path.read_text())
    node = cfg
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(cfg) if kind == "json" else yaml.safe_dump(cfg))
    refused(d, "config")


def test_tensor_with_the_wrong_shape(tiny_checkpoint, tmp_path):
    from asr.loading.torch_zip import load_state_dict

    d = clone(tiny_checkpoint, tmp_path / "shape")
    state = load_state_dict(tiny_checkpoint / "model.pt")
    tensors = {k: (v.dtype, v.array) for k, v in state.items()}
    dtype, w = tensors["audio_adaptor.linear1.weight"]
    tensors["audio_adaptor.linear1.weight"] = (dtype, np.ascontiguousarray(w.T))
    (d / "model.pt").unlink()
    tzw.save_state_dict(d / "model.pt", tensors)
    message = refused(d, r"adaptor\.linear1\.weight")
    assert "shape" in message


@pytest.mark.parametrize("keep", [0, 22, 1000, 0.5, -22, -1])
def test_truncated_model_pt(tiny_checkpoint, tmp_path, keep):
    """Cut anywhere: nothing, the end-of-directory record alone, the header, half, the directory, one byte."""
    d = clone(tiny_checkpoint, tmp_path / "trunc")
    data = (tiny_checkpoint / "model.pt").read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    _replace_model_pt(d, data[-22:] if keep == 22 else data[:cut])
    refused(d, "model.pt")
    assert not ckpt.converted_dir_for(d).exists()


def test_zip_bomb_storage(tiny_checkpoint, tmp_path):
    """A 256 MiB tensor deflated into a few hundred KiB: refused before its bytes are allocated."""
    n = 64 << 20  # float32 values
    storage = tzw._Storage("FloatStorage", "0", n)

    class View:
        def __reduce__(self):
            return tzw._REBUILD_TENSOR_V2, (storage, 0, (n,), (1,), False, collections.OrderedDict())

    buf = io.BytesIO()
    tzw._TorchPickler(buf, protocol=2).dump({"state_dict": {"audio_encoder.encoders0.0.norm1.weight": View()}})
    d = clone(tiny_checkpoint, tmp_path / "bomb")
    (d / "model.pt").unlink()
    zeros = bytes(16 << 20)
    with zipfile.ZipFile(d / "model.pt", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", b"little")
        with zf.open("archive/data/0", "w") as f:
            for _ in range(n * 4 // len(zeros)):
                f.write(zeros)
    assert (d / "model.pt").stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        message = refused(d, "zip bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20 and "uncompressed" in message


# --- a tampered converted (MLX) directory ---------------------------------------------------------------------------
@pytest.fixture
def converted(tiny_checkpoint, tiny_model, tmp_path) -> Path:
    return clone(ckpt.converted_dir_for(tiny_checkpoint), tmp_path / "converted-tiny")


def test_converted_config_with_absurd_sizes(converted):
    cfg = json.loads((converted / ckpt.MLX_CONFIG).read_text())
    cfg["llm"]["num_hidden_layers"] = 10**6
    (converted / ckpt.MLX_CONFIG).write_text(json.dumps(cfg))
    refused(converted, "num_hidden_layers")
    cfg["llm"]["num_hidden_layers"] = 2
    cfg["encoder"]["num_blocks"] = "many"
    (converted / ckpt.MLX_CONFIG).write_text(json.dumps(cfg))
    refused(converted, "num_blocks")
    (converted / ckpt.MLX_CONFIG).write_text("{not json")
    refused(converted, "cannot read")
    (converted / ckpt.MLX_CONFIG).write_text("[1, 2, 3]")
    refused(converted, "unknown format", exc=ModelLoadError)


def _safetensors(tensors: dict[str, tuple[str, list[int], int]], payload: bytes) -> bytes:
    header = json.dumps({k: {"dtype": t, "shape": s, "data_offsets": [0, n]} for k, (t, s, n) in tensors.items()})
    return len(header).to_bytes(8, "little") + header.encode() + payload


@pytest.mark.parametrize("weights", ["truncated", "empty", "huge-header", "offsets-past-the-end", "overflowing-shape"])
def test_converted_weights_tampered(converted, weights):
    """mx.load is native code: each case runs in a child process, so a crash would show as a failure here."""
    path = converted / ckpt.MLX_WEIGHTS
    data = path.read_bytes()
    path.unlink()
    if weights == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif weights == "empty":
        path.write_bytes(b"")
    elif weights == "huge-header":
        path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    elif weights == "offsets-past-the-end":
        path.write_bytes(_safetensors({"adaptor.linear1.weight": ("F32", [128, 64], 2**40)}, bytes(64)))
    else:  # 2**31 x 2**31 floats: the byte count wraps to 0 in 64 bits, so the file "holds" it
        path.write_bytes(_safetensors({"adaptor.linear1.weight": ("F32", [2**31, 2**31], 0)}, b""))
    code = ("import sys, asr\nfrom asr.errors import CheckpointError\ntry:\n    asr.load_model(sys.argv[1])\n"
            "except CheckpointError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(converted)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused:") and "weights.safetensors" in proc.stdout, proc.stdout
