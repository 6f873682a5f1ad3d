"""Random-weight Fun-ASR-Nano checkpoints in the exact official on-disk layout (numpy only, no torch).

`write_checkpoint(out_dir, size="tiny")` writes a model directory that the official
`funasr.AutoModel(model=out_dir)` loads unchanged (spec §1.1-1.4):

    config.yaml             FunASR config (FunASRNano, SenseVoiceEncoderSmall, Transformer adaptor, Qwen3 LLM,
                            WavFrontend, HuggingfaceTokenizer, dataset_conf with the SenseVoice CTC tokenizer)
    configuration.json      file_path_metas: resolves model.pt, config.yaml, Qwen3-0.6B/ and multilingual.tiktoken
                            against the model directory (funasr download/download_model_from_hub.py)
    model.pt                torch zip pickle {"state_dict": {...}}: every official key, bf16
                            (CTC branch fp32, only with ctc=True, as in the ModelScope checkpoint)
    Qwen3-0.6B/             config.json + generation_config.json + Qwen3 tokenizer files (no weights)
    multilingual.tiktoken   CTC vocabulary
    checkpoint_info.json    how this directory was made (size, seed, init scales) - not an official file

Like the official Hugging Face config, config.yaml always names the CTC decoder; with ctc=False model.pt has
no CTC tensors and the reference disables the CTC branch at load (checkpoint_utils.disable_incomplete_ctc).

    python -m tools.checkpoint OUT_DIR [--size tiny|full] [--seed 0] [--ctc]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from tools.testdata import CTC_VOCAB, write_qwen3_tokenizer
from tools.torch_zip_writer import float32_to_bf16_bits, save_state_dict

LLM_DIR_NAME = "Qwen3-0.6B"
CTC_VOCAB_NAME = "multilingual.tiktoken"

BOS_ID = 151643  # <|endoftext|>
EOS_ID = 151645  # <|im_end|>


@dataclass(frozen=True)
class Dims:
    """Every size that shapes the state dict. `full` = the released Fun-ASR-Nano-2512 (spec §1.2, §1.4, §6.1)."""

    # SenseVoiceEncoderSmall (input = 80 mels x LFR 7 = 560)
    input_size: int
    enc_dim: int
    enc_heads: int
    enc_ffn: int
    enc_blocks: int  # encoders0 (1) + encoders (enc_blocks - 1)
    enc_tp_blocks: int
    enc_kernel: int
    # Transformer adaptor: Linear enc->ffn, ReLU, Linear ffn->llm, n_layer encoder layers (FFN llm//4)
    ad_ffn: int
    ad_layers: int
    ad_heads: int
    # Qwen3 LLM
    llm_dim: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_ffn: int
    vocab: int
    # CTC decoder (same Transformer class, output = encoder dim) + CTC head
    ctc_ffn: int
    ctc_layers: int
    ctc_heads: int
    ctc_vocab: int


SIZES: dict[str, Dims] = {
    "full": Dims(
        input_size=560, enc_dim=512, enc_heads=4, enc_ffn=2048, enc_blocks=50, enc_tp_blocks=20, enc_kernel=11,
        ad_ffn=2048, ad_layers=2, ad_heads=8,
        llm_dim=1024, llm_layers=28, llm_heads=16, llm_kv_heads=8, llm_head_dim=128, llm_ffn=3072, vocab=151936,
        ctc_ffn=2048, ctc_layers=5, ctc_heads=8, ctc_vocab=60515,
    ),
    "tiny": Dims(
        input_size=560, enc_dim=64, enc_heads=4, enc_ffn=128, enc_blocks=3, enc_tp_blocks=2, enc_kernel=11,
        ad_ffn=128, ad_layers=2, ad_heads=8,
        llm_dim=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_head_dim=16, llm_ffn=128, vocab=151936,
        ctc_ffn=128, ctc_layers=2, ctc_heads=8, ctc_vocab=60515,
    ),
}


@dataclass(frozen=True)
class InitScales:
    """Standard deviations of the random init.

    Weight matrices of the encoder, adaptor and CTC branch use `gain / sqrt(fan_in)` (unit-scale activations);
    the LLM uses fixed stds. Norm weights are 1 + norm_noise * N(0,1); biases and norm biases bias_std * N(0,1).
    The LLM stds decide whether greedy decoding is a useful parity signal: too small and the residual stream is
    dominated by the input token's own embedding, so the tied LM head copies it and one token repeats
    (spec §12); `DEFAULT_SCALES` are checked against the official code (tests/test_reference_tools.py).
    """

    llm_std: float
    llm_embed_std: float
    enc_gain: float = 1.0
    fsmn_std: float = 0.1
    adaptor_gain: float = 1.0
    norm_noise: float = 0.05
    bias_std: float = 0.02


# Measured with the official code on the 6 default WAV clips, 32 greedy steps, seeds 0 and 1 (tiny, hidden 64):
#   llm std 0.02 (embed 0.02): one token on every step of every clip; 0.08/0.08: 1-10 distinct ids per clip;
#   0.3 / embed 0.15: 23-32 distinct ids per clip, clip-dependent first tokens, no two clips alike, median
#   top1-top2 logit margin ~0.16 (min ~6e-4). Random LMs still fall into a late loop on some clips.
# full (hidden 1024): spec §12 reports std 0.08 varied and 0.02 degenerate (not re-measured here).
DEFAULT_SCALES: dict[str, InitScales] = {
    "tiny": InitScales(llm_std=0.3, llm_embed_std=0.15),
    "full": InitScales(llm_std=0.08, llm_embed_std=0.08),
}


# ----------------------------------------------------------------------------------------------------------------
# key / shape / dtype table


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    rows = [(f"{prefix}.weight", (out_dim, in_dim))]
    if bias:
        rows.append((f"{prefix}.bias", (out_dim,)))
    return rows


def _layer_norm(prefix: str, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def _sanm_layer(prefix: str, in_dim: int, d: Dims) -> list[tuple[str, tuple[int, ...]]]:
    # models/sense_voice/model.py::EncoderLayerSANM + MultiHeadedAttentionSANM + PositionwiseFeedForward
    e = d.enc_dim
    return [
        *_layer_norm(f"{prefix}.norm1", in_dim),
        *_linear(f"{prefix}.self_attn.linear_q_k_v", 3 * e, in_dim),
        *_linear(f"{prefix}.self_attn.linear_out", e, e),
        (f"{prefix}.self_attn.fsmn_block.weight", (e, 1, d.enc_kernel)),
        *_layer_norm(f"{prefix}.norm2", e),
        *_linear(f"{prefix}.feed_forward.w_1", d.enc_ffn, e),
        *_linear(f"{prefix}.feed_forward.w_2", e, d.enc_ffn),
    ]


def _transformer_adaptor(prefix: str, in_dim: int, ffn: int, out_dim: int, layers: int):
    # models/llm_asr/adaptor.py::Transformer; blocks = transformer/encoder.py::EncoderLayer (FFN out_dim // 4)
    rows = [*_linear(f"{prefix}.linear1", ffn, in_dim), *_linear(f"{prefix}.linear2", out_dim, ffn)]
    for i in range(layers):
        b = f"{prefix}.blocks.{i}"
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            rows += _linear(f"{b}.self_attn.{name}", out_dim, out_dim)
        rows += _linear(f"{b}.feed_forward.w_1", out_dim // 4, out_dim)
        rows += _linear(f"{b}.feed_forward.w_2", out_dim, out_dim // 4)
        rows += _layer_norm(f"{b}.norm1", out_dim) + _layer_norm(f"{b}.norm2", out_dim)
    return rows


def state_dict_spec(size: str | Dims = "tiny", ctc: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Ordered `{key: (shape, dtype_name)}` of the official model.pt, without allocating anything."""
    d = SIZES[size] if isinstance(size, str) else size
    rows: list[tuple[str, tuple[int, ...]]] = []
    rows += _sanm_layer("audio_encoder.encoders0.0", d.input_size, d)
    rows += [r for i in range(d.enc_blocks - 1) for r in _sanm_layer(f"audio_encoder.encoders.{i}", d.enc_dim, d)]
    rows += _layer_norm("audio_encoder.after_norm", d.enc_dim)
    rows += [r for i in range(d.enc_tp_blocks) for r in _sanm_layer(f"audio_encoder.tp_encoders.{i}", d.enc_dim, d)]
    rows += _layer_norm("audio_encoder.tp_norm", d.enc_dim)
    rows += _transformer_adaptor("audio_adaptor", d.enc_dim, d.ad_ffn, d.llm_dim, d.ad_layers)

    q_dim, kv_dim = d.llm_heads * d.llm_head_dim, d.llm_kv_heads * d.llm_head_dim
    rows.append(("llm.model.embed_tokens.weight", (d.vocab, d.llm_dim)))
    for i in range(d.llm_layers):
        p = f"llm.model.layers.{i}"
        rows += [
            (f"{p}.self_attn.q_proj.weight", (q_dim, d.llm_dim)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, d.llm_dim)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, d.llm_dim)),
            (f"{p}.self_attn.o_proj.weight", (d.llm_dim, q_dim)),
            (f"{p}.self_attn.q_norm.weight", (d.llm_head_dim,)),
            (f"{p}.self_attn.k_norm.weight", (d.llm_head_dim,)),
            (f"{p}.mlp.gate_proj.weight", (d.llm_ffn, d.llm_dim)),
            (f"{p}.mlp.up_proj.weight", (d.llm_ffn, d.llm_dim)),
            (f"{p}.mlp.down_proj.weight", (d.llm_dim, d.llm_ffn)),
            (f"{p}.input_layernorm.weight", (d.llm_dim,)),
            (f"{p}.post_attention_layernorm.weight", (d.llm_dim,)),
        ]
    rows.append(("llm.model.norm.weight", (d.llm_dim,)))
    rows.append(("llm.lm_head.weight", (d.vocab, d.llm_dim)))
    spec = {k: (s, "bfloat16") for k, s in rows}
    if ctc:
        ctc_rows = _transformer_adaptor("ctc_decoder", d.enc_dim, d.ctc_ffn, d.enc_dim, d.ctc_layers)
        ctc_rows += _linear("ctc.ctc_lo", d.ctc_vocab, d.enc_dim)
        spec.update({k: (s, "float32") for k, s in ctc_rows})
    return spec


# ----------------------------------------------------------------------------------------------------------------
# config files


def config_dict(size: str | Dims = "tiny") -> dict:
    """The FunASR config.yaml content (keys as in the released Fun-ASR-Nano-2512 config, spec §1.2)."""
    d = SIZES[size] if isinstance(size, str) else size
    return {
        "model": "FunASRNano",
        "model_conf": {"lsm_weight": 0.1, "length_normalized_loss": True},
        "audio_encoder": "SenseVoiceEncoderSmall",
        "audio_encoder_conf": {
            "output_size": d.enc_dim,
            "attention_heads": d.enc_heads,
            "linear_units": d.enc_ffn,
            "num_blocks": d.enc_blocks,
            "tp_blocks": d.enc_tp_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": d.enc_kernel,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
            "freeze": True,
            "freeze_layer_num": -1,
            "feat_permute": True,
        },
        "llm": "Qwen3-0.6b",
        "llm_conf": {
            "hub": "hf",
            "freeze": True,
            "llm_dtype": "bf16",
            "init_param_path": LLM_DIR_NAME,
            "use_lora": False,
            "lora_conf": {
                "freeze_lora": True,
                "task_type": "CAUSAL_LM",
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
            },
        },
        "audio_adaptor": "Transformer",
        "audio_adaptor_conf": {
            "downsample_rate": 1,
            "use_low_frame_rate": True,
            "ffn_dim": d.ad_ffn,
            "llm_dim": d.llm_dim,
            "encoder_dim": d.enc_dim,
            "n_layer": d.ad_layers,
            "attention_heads": d.ad_heads,
            "freeze": True,
        },
        "ctc_decoder": "Transformer",
        "detach_ctc_decoder": True,
        "ctc_decoder_conf": {
            "downsample_rate": 1,
            "ffn_dim": d.ctc_ffn,
            "llm_dim": d.enc_dim,
            "encoder_dim": d.enc_dim,
            "n_layer": d.ctc_layers,
            "attention_heads": d.ctc_heads,
            "freeze": False,
        },
        "ctc_weight": 1.0,
        "ctc_vocab_size": d.ctc_vocab,
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": 80,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": 7,
            "lfr_n": 6,
            "cmvn_file": None,
        },
        "tokenizer": "HuggingfaceTokenizer",
        "tokenizer_conf": {"init_param_path": "${llm_conf.init_param_path}"},
        "dataset": "FunASR",
        "dataset_conf": {
            "index_ds": "FunASR",
            "batch_sampler": "BatchSampler",
            "batch_type": "token",
            "batch_size": 6000,
            "max_token_length": 3500,
            "shuffle": True,
            "num_workers": 4,
            "audio_adaptor_downsample_rate": 1,
            "audio_encoder_downsample_rate": 6,
            "prompt_classes": "MultiContextPrompt",
            "prompt_conf": {"max_neg_hotwords_num": 0, "min_neg_hotwords_num": 0, "use_hist": False},
            "ctc_tokenizer": "SenseVoiceTokenizer",
            "ctc_target_normalize": True,
            "ctc_tokenizer_conf": {"vocab_path": CTC_VOCAB_NAME, "is_multilingual": True, "num_languages": 8749},
        },
    }


def configuration_json() -> dict:
    """ModelScope/FunASR `configuration.json`: paths in file_path_metas are joined onto the model directory."""
    return {
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "model_name_in_hub": {"ms": "", "hf": ""},
        "file_path_metas": {
            "init_param": "model.pt",
            "config": "config.yaml",
            "llm_conf": {"init_param_path": LLM_DIR_NAME},
            "tokenizer_conf": {"init_param_path": LLM_DIR_NAME},
            "dataset_conf": {"ctc_tokenizer_conf": {"vocab_path": CTC_VOCAB_NAME}},
        },
    }


def qwen3_config(size: str | Dims = "tiny") -> dict:
    """`Qwen3-0.6B/config.json` (full = public Qwen/Qwen3-0.6B values, spec §6.1)."""
    d = SIZES[size] if isinstance(size, str) else size
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": d.llm_head_dim,
        "hidden_act": "silu",
        "hidden_size": d.llm_dim,
        "initializer_range": 0.02,
        "intermediate_size": d.llm_ffn,
        "max_position_embeddings": 40960,
        "max_window_layers": d.llm_layers,
        "model_type": "qwen3",
        "num_attention_heads": d.llm_heads,
        "num_hidden_layers": d.llm_layers,
        "num_key_value_heads": d.llm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": d.vocab,
    }


# Qwen/Qwen3-0.6B generation_config.json values. The reference builds the LLM with from_config and never reads
# this file (spec §6.3: decoding is greedy); it is written so a port can be tested for ignoring it too.
QWEN3_GENERATION_CONFIG = {
    "bos_token_id": BOS_ID,
    "do_sample": True,
    "eos_token_id": [EOS_ID, BOS_ID],
    "pad_token_id": BOS_ID,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}


# ----------------------------------------------------------------------------------------------------------------
# random weights


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:]))


def random_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator, scales: InitScales) -> np.ndarray:
    """One float32 tensor drawn for `key` (the caller draws keys in state-dict order, so the seed fixes all)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    is_norm = "norm" in key.rsplit(".", 2)[-2]  # norm1/2, after_norm, tp_norm, q_norm, *_layernorm, model.norm
    if is_norm:
        return 1.0 + scales.norm_noise * x if key.endswith("weight") else scales.bias_std * x
    if key.endswith(".bias"):
        return scales.bias_std * x
    if key == "llm.model.embed_tokens.weight":
        return scales.llm_embed_std * x
    if key.startswith("llm."):
        return scales.llm_std * x
    if key.endswith("fsmn_block.weight"):
        return scales.fsmn_std * x
    gain = scales.enc_gain if key.startswith(("audio_encoder.", "ctc")) else scales.adaptor_gain
    return (gain / np.sqrt(_fan_in(shape))).astype(np.float32) * x


def random_state_dict(size: str | Dims = "tiny", seed: int = 0, ctc: bool = False,
                      scales: InitScales | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """`{key: (dtype_name, array)}` ready for the torch-free writer; bf16 tensors are given as uint16 bit patterns.

    `llm.lm_head.weight` is the same bits as `llm.model.embed_tokens.weight` (tied embeddings).
    """
    scales = scales or DEFAULT_SCALES[size if isinstance(size, str) else "tiny"]
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for key, (shape, dtype) in state_dict_spec(size, ctc).items():
        if key == "llm.lm_head.weight":
            out[key] = out["llm.model.embed_tokens.weight"]
            continue
        x = random_tensor(key, shape, rng, scales)
        out[key] = ("bfloat16", float32_to_bf16_bits(x)) if dtype == "bfloat16" else ("float32", x)
    return out


# ----------------------------------------------------------------------------------------------------------------
# writer


def write_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0, ctc: bool = False,
                     variant: str = "nano", scales: InitScales | None = None) -> Path:
    """Write a complete random-weight model directory and return its path.

    `variant` ("nano" or "mlt") is only recorded: both releases share one architecture and tensor layout.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if variant not in ("nano", "mlt"):
        raise ValueError(f"variant must be 'nano' or 'mlt', got {variant!r}")
    scales = scales or DEFAULT_SCALES[size]
    out = Path(out_dir)
    llm_dir = out / LLM_DIR_NAME
    llm_dir.mkdir(parents=True, exist_ok=True)

    (out / "config.yaml").write_text(
        yaml.safe_dump(config_dict(size), sort_keys=False, allow_unicode=True, width=120), encoding="utf-8"
    )
    (out / "configuration.json").write_text(json.dumps(configuration_json(), indent=2) + "\n", encoding="utf-8")
    (llm_dir / "config.json").write_text(json.dumps(qwen3_config(size), indent=2) + "\n", encoding="utf-8")
    (llm_dir / "generation_config.json").write_text(json.dumps(QWEN3_GENERATION_CONFIG, indent=2) + "\n",
                                                     encoding="utf-8")
    write_qwen3_tokenizer(llm_dir)
    shutil.copyfile(CTC_VOCAB, out / CTC_VOCAB_NAME)

    save_state_dict(out / "model.pt", random_state_dict(size, seed, ctc, scales))
    info = {"size": size, "seed": seed, "ctc": ctc, "variant": variant, "dims": asdict(SIZES[size]),
            "init_scales": asdict(scales)}
    (out / "checkpoint_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctc", action="store_true", help="also write the CTC decoder + head tensors (fp32)")
    ap.add_argument("--variant", choices=("nano", "mlt"), default="nano")
    args = ap.parse_args(argv)
    path = write_checkpoint(args.out_dir, size=args.size, seed=args.seed, ctc=args.ctc, variant=args.variant)
    print(f"wrote {path} ({(path / 'model.pt').stat().st_size / 1e6:.1f} MB model.pt)")


if __name__ == "__main__":
    main()
