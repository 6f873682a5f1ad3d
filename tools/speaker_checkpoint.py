"""Random-weight CAM++ checkpoints in the layout of `iic/speech_campplus_sv_zh-cn_16k-common` (numpy only, no torch).

`write_checkpoint(out_dir, size="tiny", seed=0)` writes a model directory that the official
`funasr.AutoModel(model=out_dir)` loads unchanged:

    config.yaml              FunASR config: `model: CAMPPlus` + model_conf (feat_dim, embedding_size, growth_rate,
                             bn_size, init_channels, config_str, memory_efficient, output_level), WavFrontend
                             (built by AutoModel, unused by CAMPPlus.inference, which computes its own fbank)
    configuration.json       ModelScope metadata (task speaker-verification, model type cam++-sv with model_config
                             sample_rate / fbank_dim / emb_size and pretrained_model) + file_path_metas, which
                             funasr's download_model_from_hub.py joins onto the directory (init_param, config)
    campplus_cn_common.bin   torch.save zip of the BARE state dict (no {"state_dict": ...} wrapper), float32, every
                             key of CAMPPlus().state_dict() in its order, BatchNorm num_batches_tracked (int64)
                             included
    checkpoint_info.json     how this directory was made (size, seed, init) - not an official file

Sizes: `full` = the released model's config (feat_dim 80, embedding 192, growth 32, bn_size 4, init_channels 128;
6.85M trainable parameters, 6.93M values with the BatchNorm statistics, 28.0 MB); `tiny` keeps every layer (the
block depths 12/24/16 and the FCM head are fixed by the official class) with narrow channels (growth 8, bn_size 2,
init_channels 32; 0.43M parameters, 2.1 MB).

    python -m tools.speaker_checkpoint OUT_DIR [--size tiny|full] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from tools.torch_zip_writer import save_state_dict

WEIGHTS_NAME = "campplus_cn_common.bin"
FCM_CHANNELS = 32
DENSE_BLOCKS = ((12, 3), (24, 3), (16, 3))  # (layers, kernel) of CAMPPlus.__init__


@dataclass(frozen=True)
class Dims:
    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    config_str: str = "batchnorm-relu"


SIZES: dict[str, Dims] = {
    "full": Dims(),
    "tiny": Dims(growth_rate=8, bn_size=2, init_channels=32),
}


# --- the state dict, in CAMPPlus().state_dict() order ---------------------------------------------------------
# each row: (key, shape, kind); kinds: conv (kaiming fan_in), bias, bn_w, bn_b, bn_mean, bn_var, bn_count, prelu
Row = tuple[str, tuple[int, ...], str]


def _bn(prefix: str, c: int, affine: bool = True) -> list[Row]:
    rows = [(f"{prefix}.weight", (c,), "bn_w"), (f"{prefix}.bias", (c,), "bn_b")] if affine else []
    return rows + [(f"{prefix}.running_mean", (c,), "bn_mean"), (f"{prefix}.running_var", (c,), "bn_var"),
                   (f"{prefix}.num_batches_tracked", (), "bn_count")]


def _nonlinear(prefix: str, config_str: str, c: int) -> list[Row]:
    rows: list[Row] = []
    for op in config_str.split("-"):
        if op in ("batchnorm", "batchnorm_"):
            rows += _bn(f"{prefix}.batchnorm", c, affine=op == "batchnorm")
        elif op == "prelu":
            rows.append((f"{prefix}.prelu.weight", (c,), "prelu"))
        elif op != "relu":
            raise ValueError(f"unknown nonlinearity {op!r}")
    return rows


def _res_block(prefix: str, stride: int) -> list[Row]:
    m = FCM_CHANNELS
    rows = [(f"{prefix}.conv1.weight", (m, m, 3, 3), "conv"), *_bn(f"{prefix}.bn1", m),
            (f"{prefix}.conv2.weight", (m, m, 3, 3), "conv"), *_bn(f"{prefix}.bn2", m)]
    if stride != 1:
        rows += [(f"{prefix}.shortcut.0.weight", (m, m, 1, 1), "conv"), *_bn(f"{prefix}.shortcut.1", m)]
    return rows


def state_dict_spec(size: str | Dims = "tiny") -> list[Row]:
    """Ordered rows of the official state dict (ref: funasr/models/campplus/model.py, components.py)."""
    d = SIZES[size] if isinstance(size, str) else size
    m, cs = FCM_CHANNELS, d.config_str
    rows: list[Row] = [("head.conv1.weight", (m, 1, 3, 3), "conv"), *_bn("head.bn1", m)]
    for layer in ("layer1", "layer2"):
        rows += _res_block(f"head.{layer}.0", 2) + _res_block(f"head.{layer}.1", 1)
    rows += [("head.conv2.weight", (m, m, 3, 3), "conv"), *_bn("head.bn2", m)]

    head_channels = m * (d.feat_dim // 8)
    rows += [("xvector.tdnn.linear.weight", (d.init_channels, head_channels, 5), "conv"),
             *_nonlinear("xvector.tdnn.nonlinear", cs, d.init_channels)]
    ch, bn = d.init_channels, d.bn_size * d.growth_rate
    for b, (layers, kernel) in enumerate(DENSE_BLOCKS, start=1):
        for j in range(layers):
            p, cin = f"xvector.block{b}.tdnnd{j + 1}", ch + j * d.growth_rate
            rows += [*_nonlinear(f"{p}.nonlinear1", cs, cin), (f"{p}.linear1.weight", (bn, cin, 1), "conv"),
                     *_nonlinear(f"{p}.nonlinear2", cs, bn),
                     (f"{p}.cam_layer.linear_local.weight", (d.growth_rate, bn, kernel), "conv"),
                     (f"{p}.cam_layer.linear1.weight", (bn // 2, bn, 1), "conv"),
                     (f"{p}.cam_layer.linear1.bias", (bn // 2,), "bias"),
                     (f"{p}.cam_layer.linear2.weight", (d.growth_rate, bn // 2, 1), "conv"),
                     (f"{p}.cam_layer.linear2.bias", (d.growth_rate,), "bias")]
        ch += layers * d.growth_rate
        rows += [*_nonlinear(f"xvector.transit{b}.nonlinear", cs, ch),
                 (f"xvector.transit{b}.linear.weight", (ch // 2, ch, 1), "conv")]
        ch //= 2
    rows += _nonlinear("xvector.out_nonlinear", cs, ch)
    rows += [("xvector.dense.linear.weight", (d.embedding_size, ch * 2, 1), "conv"),
             *_nonlinear("xvector.dense.nonlinear", "batchnorm_", d.embedding_size)]
    return rows


def num_params(size: str | Dims) -> int:
    """Float values in the state dict (parameters and BatchNorm running statistics)."""
    return sum(math.prod(s) for _k, s, kind in state_dict_spec(size) if kind != "bn_count")


def random_state(size: str | Dims, seed: int) -> dict[str, tuple[str, np.ndarray]]:
    """{key: (torch dtype, values)}: convolutions kaiming-normal (the official init), biases and BatchNorm affine
    parameters and running statistics drawn around their trained magnitudes, so that every value path is exercised
    (no zero bias, no identity BatchNorm)."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for key, shape, kind in state_dict_spec(size):
        if kind == "bn_count":
            out[key] = ("int64", np.array(rng.integers(1_000, 1_000_000), dtype=np.int64).reshape(()))
            continue
        if kind == "conv":
            fan_in = math.prod(shape[1:])
            v = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
        elif kind == "bias":
            v = rng.normal(0.0, 0.1, shape)
        elif kind == "bn_w":
            v = rng.uniform(0.6, 1.4, shape)
        elif kind == "bn_b":
            v = rng.normal(0.0, 0.1, shape)
        elif kind == "bn_mean":
            v = rng.normal(0.0, 0.2, shape)
        elif kind == "bn_var":
            v = rng.uniform(0.5, 2.0, shape)
        elif kind == "prelu":
            v = rng.uniform(0.1, 0.4, shape)
        else:  # pragma: no cover
            raise AssertionError(kind)
        out[key] = ("float32", np.asarray(v, dtype=np.float32))
    return out


# --- config files ------------------------------------------------------------------------------------------------
def config_yaml(size: str | Dims = "tiny") -> dict:
    d = SIZES[size] if isinstance(size, str) else size
    return {
        "model": "CAMPPlus",
        "model_conf": {"feat_dim": d.feat_dim, "embedding_size": d.embedding_size, "growth_rate": d.growth_rate,
                       "bn_size": d.bn_size, "init_channels": d.init_channels, "config_str": d.config_str,
                       "memory_efficient": True, "output_level": "segment"},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000},
    }


def configuration_json(size: str | Dims = "tiny") -> dict:
    d = SIZES[size] if isinstance(size, str) else size
    return {
        "framework": "pytorch",
        "task": "speaker-verification",
        "model": {
            "type": "cam++-sv",
            "model_config": {"sample_rate": 16000, "fbank_dim": d.feat_dim, "emb_size": d.embedding_size},
            "pretrained_model": WEIGHTS_NAME,
            "yesOrno_thr": 0.31,
        },
        "pipeline": {"type": "speaker-verification"},
        "file_path_metas": {"init_param": WEIGHTS_NAME, "config": "config.yaml"},
    }


def write_checkpoint(out_dir, size: str = "tiny", seed: int = 0, *, config_yaml_file: bool = True) -> Path:
    """Write the directory; `config_yaml_file=False` leaves config.yaml out (the older ModelScope layout, where only
    configuration.json describes the model)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (known: {sorted(SIZES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(out / WEIGHTS_NAME, random_state(size, seed), wrap_key=None)
    if config_yaml_file:
        (out / "config.yaml").write_text(yaml.safe_dump(config_yaml(size), sort_keys=False), encoding="utf-8")
    (out / "configuration.json").write_text(json.dumps(configuration_json(size), indent=4) + "\n", encoding="utf-8")
    info = {"generated_by": "tools/speaker_checkpoint.py", "size": size, "seed": seed, "dims": asdict(SIZES[size]),
            "params": num_params(size), "init": "conv kaiming-normal; bias N(0,0.1); BN weight U(0.6,1.4), "
            "bias N(0,0.1), running_mean N(0,0.2), running_var U(0.5,2); PReLU U(0.1,0.4)"}
    (out / "checkpoint_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight CAM++ checkpoint in the official layout.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d = write_checkpoint(args.out, args.size, args.seed)
    print(f"wrote {d} ({args.size}, seed {args.seed}, {num_params(args.size):,} values)")


if __name__ == "__main__":
    main()
