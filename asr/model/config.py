"""The model's hyper-parameters, read from the checkpoint's own config and checked before any module is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx

from ..audio.features import FrontendConfig
from ..audio.io import SAMPLE_RATE
from ..errors import CheckpointError
from .adaptor import AdaptorConfig
from .encoder import EncoderConfig

CONFIG_FILE = "mlx_config.json"  # a converted model's config (ModelConfig.to_json)
FORMAT_VERSION = 2  # of the converted layout; another version is converted again
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# bounds on what a config may declare (the released models: encoder 50 blocks, LLM 28 layers, width <= 3072)
_MAX_LAYERS, _MAX_DIM, _MAX_HEADS, _MAX_VOCAB = 512, 1 << 16, 1024, 1 << 21


@dataclass(frozen=True)
class ModelConfig:
    variant: str
    frontend: FrontendConfig
    encoder: EncoderConfig
    adaptor: AdaptorConfig
    llm: dict
    ctc: AdaptorConfig | None = None
    ctc_vocab_size: int = 60515
    rope_bf16: bool = True  # the reference casts the LLM (and its RoPE inv_freq buffer) to llm_conf.llm_dtype

    @classmethod
    def from_official(cls, y: dict, llm_config: dict, variant: str) -> ModelConfig:
        """From the official config.yaml (`y`) and the LLM's config.json."""
        try:
            fe = FrontendConfig.from_dict(y.get("frontend_conf") or {})
            enc = EncoderConfig.from_dict(y["audio_encoder_conf"], input_size=fe.feature_dim)
            llm_dim = int(llm_config["hidden_size"])
            ada = AdaptorConfig.from_dict(y["audio_adaptor_conf"], encoder_dim=enc.output_size, llm_dim=llm_dim)
            ctc = None
            if y.get("ctc_decoder") == "Transformer":
                ctc = AdaptorConfig.from_dict(y.get("ctc_decoder_conf") or {}, encoder_dim=enc.output_size,
                                              llm_dim=(y.get("ctc_decoder_conf") or {}).get("llm_dim", 512))
            ctc_vocab_size = int(y.get("ctc_vocab_size", 60515))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:  # e.g. a list for a section
            raise CheckpointError(f"config.yaml: {exc}") from exc
        if not y["audio_adaptor_conf"].get("use_low_frame_rate", True):
            raise CheckpointError("config.yaml: use_low_frame_rate false is not supported")
        return cls(variant=variant, frontend=fe, encoder=enc, adaptor=ada, llm=llm_config, ctc=ctc,
                   ctc_vocab_size=ctc_vocab_size,
                   rope_bf16=str(y["llm_conf"].get("llm_dtype", "fp32")) == "bf16")._checked("config.yaml")

    def to_json(self) -> dict:
        return {"format": "funasr-nano-mlx", "version": FORMAT_VERSION, "variant": self.variant,
                "frontend": asdict(self.frontend), "encoder": asdict(self.encoder), "adaptor": asdict(self.adaptor),
                "llm": self.llm, "ctc": asdict(self.ctc) if self.ctc else None, "ctc_vocab_size": self.ctc_vocab_size,
                "rope_bf16": self.rope_bf16}

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict) or d.get("format") != "funasr-nano-mlx" or d.get("version") != FORMAT_VERSION:
            what = f"{d.get('format')}/{d.get('version')}" if isinstance(d, dict) else f"a JSON {type(d).__name__}"
            raise CheckpointError(f"{CONFIG_FILE}: unknown format/version {what}; convert the official model again")
        try:
            cfg = cls(variant=d["variant"], frontend=FrontendConfig(**d["frontend"]),
                      encoder=EncoderConfig(**d["encoder"]), adaptor=AdaptorConfig(**d["adaptor"]), llm=d["llm"],
                      ctc=AdaptorConfig(**d["ctc"]) if d.get("ctc") else None,
                      ctc_vocab_size=int(d.get("ctc_vocab_size", 60515)), rope_bf16=bool(d.get("rope_bf16", True)))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise CheckpointError(f"{CONFIG_FILE} is incomplete: {exc}") from exc
        return cfg._checked(CONFIG_FILE)

    def _checked(self, where: str) -> ModelConfig:
        """Refuse sizes no Fun-ASR-Nano model has, before any module is built: modules are created eagerly
        (only their weights are lazy), so a config declaring a million layers would exhaust memory (and a 2**40
        width would overflow MLX) before the strict shape check could refuse it."""
        if not isinstance(self.llm, dict):
            raise CheckpointError(f"{where}: the LLM config is not a JSON object")
        sizes: list = []
        for key, hi in (("num_hidden_layers", _MAX_LAYERS), ("hidden_size", _MAX_DIM), ("intermediate_size", _MAX_DIM),
                        ("num_attention_heads", _MAX_HEADS), ("num_key_value_heads", _MAX_HEADS),
                        ("head_dim", _MAX_DIM), ("vocab_size", _MAX_VOCAB)):
            if key in self.llm:
                sizes.append((f"LLM config.json {key}", self.llm[key], 1, hi))
        e, fe = self.encoder, self.frontend
        sizes += [("audio_encoder_conf.num_blocks", e.num_blocks, 1, _MAX_LAYERS),
                  ("audio_encoder_conf.tp_blocks", e.tp_blocks, 0, _MAX_LAYERS),
                  ("audio_encoder_conf.output_size", e.output_size, 1, _MAX_DIM),
                  ("audio_encoder_conf.linear_units", e.linear_units, 1, _MAX_DIM),
                  ("audio_encoder_conf.attention_heads", e.attention_heads, 1, _MAX_HEADS),
                  ("audio_encoder_conf.kernel_size", e.kernel_size, 1, _MAX_HEADS),
                  ("frontend_conf.n_mels", fe.n_mels, 1, _MAX_HEADS), ("frontend_conf.lfr_m", fe.lfr_m, 1, 64),
                  ("frontend_conf.lfr_n", fe.lfr_n, 1, 64), ("ctc_vocab_size", self.ctc_vocab_size, 1, _MAX_VOCAB)]
        for name, ada in (("audio_adaptor_conf", self.adaptor), ("ctc_decoder_conf", self.ctc)):
            if ada is not None:
                sizes += [(f"{name}.n_layer", ada.n_layer, 0, _MAX_LAYERS), (f"{name}.ffn_dim", ada.ffn_dim, 1, _MAX_DIM),
                          (f"{name}.llm_dim", ada.llm_dim, 1, _MAX_DIM),
                          (f"{name}.attention_heads", ada.attention_heads, 1, _MAX_HEADS)]
        for name, value, lo, hi in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise CheckpointError(f"{where}: {name} = {value!r:.40} is outside the supported range {lo}..{hi}; "
                                      "the config is corrupt or not a Fun-ASR-Nano model")
        frames = (fe.frame_length_ms, fe.frame_shift_ms)
        if not (all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1000 for f in frames)
                and fe.sample_rate == SAMPLE_RATE):
            raise CheckpointError(f"{where}: frontend_conf (fs {fe.sample_rate}, frame {fe.frame_length_ms}/"
                                  f"{fe.frame_shift_ms} ms) is not a 16 kHz fbank frontend")
        return self
