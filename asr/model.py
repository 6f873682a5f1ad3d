"""Fun-ASR-Nano on MLX: the network, loading, and `transcribe`.

Pipeline (ref: funasr/models/fun_asr_nano/model.py::inference / inference_prepare / inference_llm):
audio -> fbank+LFR (frontend.py) -> SAN-M encoder (encoder.py) -> adaptor (adaptor.py) -> first ceil(L/8)
rows spliced into the ChatML prompt (prompt.py) -> Qwen3 greedy decoding (llm.py) -> text cleanup.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import checkpoint as ckpt
from . import languages as langs
from .adaptor import Adaptor, AdaptorConfig
from .audio import SAMPLE_RATE
from .encoder import EncoderConfig, SenseVoiceEncoder
from .errors import CheckpointError, InvalidOptionError, ModelLoadError, TranscriptionCancelled
from .frontend import FrontendConfig, audio_token_count, features, features_batch
from .llm import build_llm, greedy_decode, greedy_decode_batch
from .prompt import PromptIds, PromptTokenizer, clean_hotwords, clean_text, instruction
from .types import Language, Segment, Timings, TranscriptionResult

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f32": "float32", "f16": "float16"}
MAX_NEW_TOKENS_LIMIT = 4096
# bounds on what a config may declare (the released models: encoder 50 blocks, LLM 28 layers, width <= 3072)
_MAX_LAYERS, _MAX_DIM, _MAX_HEADS, _MAX_VOCAB = 512, 1 << 16, 1024, 1 << 21

ProgressFn = Callable[[float, float, str], None]


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
    def from_official(cls, oc: ckpt.OfficialConfig, variant: str) -> ModelConfig:
        y = oc.yaml
        try:
            fe = FrontendConfig.from_dict(y.get("frontend_conf") or {})
            enc = EncoderConfig.from_dict(y["audio_encoder_conf"], input_size=fe.feature_dim)
            llm_dim = int(oc.llm_config["hidden_size"])
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
        return cls(variant=variant, frontend=fe, encoder=enc, adaptor=ada, llm=oc.llm_config, ctc=ctc,
                   ctc_vocab_size=ctc_vocab_size,
                   rope_bf16=str(y["llm_conf"].get("llm_dtype", "fp32")) == "bf16")._checked("config.yaml")

    def to_json(self) -> dict:
        return {"format": "funasr-nano-mlx", "version": ckpt.FORMAT_VERSION, "variant": self.variant,
                "frontend": asdict(self.frontend), "encoder": asdict(self.encoder), "adaptor": asdict(self.adaptor),
                "llm": self.llm, "ctc": asdict(self.ctc) if self.ctc else None, "ctc_vocab_size": self.ctc_vocab_size,
                "rope_bf16": self.rope_bf16}

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict) or d.get("format") != "funasr-nano-mlx" or d.get("version") != ckpt.FORMAT_VERSION:
            what = f"{d.get('format')}/{d.get('version')}" if isinstance(d, dict) else f"a JSON {type(d).__name__}"
            raise CheckpointError(f"{ckpt.MLX_CONFIG}: unknown format/version {what}; convert the official model again")
        try:
            cfg = cls(variant=d["variant"], frontend=FrontendConfig(**d["frontend"]),
                      encoder=EncoderConfig(**d["encoder"]), adaptor=AdaptorConfig(**d["adaptor"]), llm=d["llm"],
                      ctc=AdaptorConfig(**d["ctc"]) if d.get("ctc") else None,
                      ctc_vocab_size=int(d.get("ctc_vocab_size", 60515)), rope_bf16=bool(d.get("rope_bf16", True)))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise CheckpointError(f"{ckpt.MLX_CONFIG} is incomplete: {exc}") from exc
        return cfg._checked(ckpt.MLX_CONFIG)

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


class FunASRNanoNet(nn.Module):
    """All weights of the model, named like the official state dict (see checkpoint.official_key_to_mlx)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = SenseVoiceEncoder(cfg.encoder)
        self.adaptor = Adaptor(cfg.adaptor)
        self.llm = build_llm(cfg.llm, cfg.rope_bf16)
        if cfg.ctc is not None:
            self.ctc_decoder = Adaptor(cfg.ctc)
            self.ctc_lo = nn.Linear(cfg.ctc.llm_dim, cfg.ctc_vocab_size)


# --- conversion ----------------------------------------------------------------------------------------
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    net = FunASRNanoNet(cfg)  # MLX allocates lazily; shapes only
    return {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}


def _strict_check(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where} is incomplete: {len(missing)} tensors missing, e.g. {missing[:5]}; "
                              "the file is truncated or not a Fun-ASR-Nano checkpoint")
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}; "
                              "is it a different model or a mismatched config.yaml?")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(found[k])}, the config expects {list(shape)}")


def convert(model_dir: Path, out_dir: Path, variant: str) -> Path:
    """Convert an official directory into our MLX layout, atomically (nothing half-written on failure)."""
    from .torch_zip import load_state_dict

    oc = ckpt.read_official_config(model_dir)
    cfg = ModelConfig.from_official(oc, variant)
    t0 = time.perf_counter()
    state = load_state_dict(model_dir / "model.pt")
    has_ctc = cfg.ctc is not None and any(k.startswith("ctc_decoder.") for k in state)
    if cfg.ctc is not None and not has_ctc:
        log.info("checkpoint has no CTC tensors: timestamps from CTC alignment are unavailable")
        cfg = ModelConfig(**{**cfg.__dict__, "ctc": None})
    expected = _expected_shapes(cfg)
    weights: dict[str, mx.array] = {}
    found: dict[str, tuple[int, ...]] = {}
    for key, tensor in state.items():
        name = ckpt.official_key_to_mlx(key)
        if name is None:
            continue
        if cfg.ctc is None and (name.startswith("ctc_decoder.") or name.startswith("ctc_lo.")):
            continue
        arr = tensor.to_mlx()
        if name.endswith("self_attn.fsmn_weight"):
            arr = arr.transpose(0, 2, 1)  # torch [C, 1, K] -> MLX depthwise [C, K, 1]
        weights[name] = arr
        found[name] = tuple(arr.shape)
    _strict_check(found, expected, str(model_dir / "model.pt"))
    lm_head = state.get("llm.lm_head.weight")
    if lm_head is not None and cfg.llm.get("tie_word_embeddings", True):
        emb = state["llm.model.embed_tokens.weight"]
        if lm_head.array.shape != emb.array.shape:
            raise CheckpointError("model.pt: llm.lm_head.weight and llm.model.embed_tokens.weight differ in shape")
        if not np.array_equal(lm_head.array, emb.array):
            # the reference ties both to one tensor and loads lm_head last, so its values win
            log.warning("llm.lm_head.weight differs from the embeddings; using lm_head values for both (as the reference)")
            weights["llm.model.embed_tokens.weight"] = lm_head.to_mlx()
    del state
    with ckpt.atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / ckpt.MLX_WEIGHTS), weights)
        (tmp / ckpt.MLX_CONFIG).write_text(json.dumps({**cfg.to_json(), "source": str(model_dir)}, indent=1,
                                                      ensure_ascii=False))
        shutil.copy2(oc.llm_dir / "tokenizer.json", tmp / "tokenizer.json")
        if (model_dir / "multilingual.tiktoken").is_file():
            shutil.copy2(model_dir / "multilingual.tiktoken", tmp / "multilingual.tiktoken")
    log.info("converted %s -> %s in %.1f s", model_dir, out_dir, time.perf_counter() - t0)
    return out_dir


# --- the model -----------------------------------------------------------------------------------------
SHORT_AUDIO_S = 30.0  # up to this, audio is decoded in one pass like the reference (VAD only checks for speech)
STREAM_ABOVE_S = 600.0  # files longer than this are read twice in blocks (VAD pass, decode pass)
BLOCK_S = 60.0


@dataclass
class _Piece:
    """A segment to decode: times in the original audio, and its samples."""

    start: float
    end: float
    samples: np.ndarray
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    ctc: object | None = None  # asr.ctc.CTCResult when token timestamps were computed


class FunASRNano:
    """A loaded model. Thread-affine under MLX: load it and call it from one thread."""

    def __init__(self, net: FunASRNanoNet, cfg: ModelConfig, tokenizer: PromptTokenizer, *, name: str,
                 dtype: str, quantization: int | None, encoder_dtype: str, model_dir: Path):
        self.net = net
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = dtype
        self.encoder_dtype = encoder_dtype
        self.quantization = quantization
        self.model_dir = model_dir
        self.eos_ids = {tokenizer.im_end}
        eos = cfg.llm.get("eos_token_id")
        for e in (eos if isinstance(eos, list) else [eos]):
            if isinstance(e, int):
                self.eos_ids.add(e)
        self._prompt_cache: dict[tuple, PromptIds] = {}
        self._vad = None
        self._ctc_tok = None

    # ---- properties the server reads
    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def languages(self) -> list[Language]:
        return langs.languages(self.variant)

    @property
    def has_ctc(self) -> bool:
        return self.cfg.ctc is not None

    @property
    def timestamps_available(self) -> bool:
        return self.has_ctc and (self.model_dir / "multilingual.tiktoken").is_file()

    def _ctc_tokenizer(self):
        if self._ctc_tok is None:
            from .ctc import CTCTokenizer

            self._ctc_tok = CTCTokenizer.from_file(self.model_dir / "multilingual.tiktoken")
        return self._ctc_tok

    @property
    def vad(self):
        if self._vad is None:
            from .vad import SileroVAD

            self._vad = SileroVAD.load()
        return self._vad

    # ---- stages (public for parity tests and benchmarks)
    def features(self, samples: np.ndarray | mx.array) -> mx.array:
        return features(mx.array(samples), self.cfg.frontend)

    def encode(self, feats: mx.array, lengths: mx.array | None = None) -> mx.array:
        """[L, 560] -> [L, 512], or batched [B, L, 560] with lengths -> [B, L, 512]."""
        x = feats if feats.ndim == 3 else feats[None]
        out = self.net.encoder(x.astype(DTYPES[self.encoder_dtype]), lengths).astype(mx.float32)
        return out if feats.ndim == 3 else out[0]

    def adapt(self, enc: mx.array, lengths: mx.array | None = None) -> mx.array:
        x = enc if enc.ndim == 3 else enc[None]
        out = self.net.adaptor(x, lengths)
        return out if enc.ndim == 3 else out[0]

    def prompt_ids(self, language: str | None = None, hotwords: list[str] | None = None, itn: bool = True) -> PromptIds:
        lang = langs.resolve(language, self.variant)
        key = (lang.prompt_name if lang else None, tuple(clean_hotwords(hotwords)), bool(itn))
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.tokenizer.prompt_ids(instruction(list(key[1]), key[0], key[2]))
        return self._prompt_cache[key]

    def prompt_embeddings(self, audio_rows: mx.array, ids: PromptIds) -> mx.array:
        """[1, P, D]: embeddings of the prefix | audio rows | suffix (ref: inference_prepare)."""
        emb = self.net.llm.model.embed_tokens
        dt = DTYPES[self.dtype]
        parts = [emb(mx.array(ids.prefix, dtype=mx.int32)).astype(dt), audio_rows.astype(dt),
                 emb(mx.array(ids.suffix, dtype=mx.int32)).astype(dt)]
        return mx.concatenate(parts, axis=0)[None]

    # ---- a batch of segments
    def _decode_batch(self, pieces: list[_Piece], ids: PromptIds, max_new_tokens: int, repetition_guard: bool,
                      cancel: threading.Event | None, t: dict, timestamps: bool = False) -> None:
        t0 = time.perf_counter()
        if len(pieces) == 1:
            feats = [self.features(pieces[0].samples)]
        else:
            feats = features_batch([mx.array(p.samples) for p in pieces], self.cfg.frontend)
        mx.eval(feats)
        t["features_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(pieces) == 1:
            enc, lengths = self.encode(feats[0])[None], None
        else:
            L = max(f.shape[0] for f in feats)
            lengths = mx.array([f.shape[0] for f in feats])
            batch = mx.stack([mx.pad(f, [(0, L - f.shape[0]), (0, 0)]) for f in feats])
            enc = self.encode(batch, lengths)
        mx.eval(enc)
        t["encoder_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = self.adapt(enc, lengths)
        prompts = [self.prompt_embeddings(rows[i, : audio_token_count(f.shape[0])], ids)[0] for i, f in enumerate(feats)]
        mx.eval(prompts)
        t["adaptor_s"] += time.perf_counter() - t0
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        if len(pieces) == 1:
            outs = [greedy_decode(self.net.llm, prompts[0][None], eos_ids=self.eos_ids, max_new_tokens=max_new_tokens,
                                  cancel=cancel, repetition_guard=repetition_guard)]
        else:
            outs = greedy_decode_batch(self.net.llm, prompts, eos_ids=self.eos_ids, max_new_tokens=max_new_tokens,
                                       cancel=cancel, repetition_guard=repetition_guard)
        t["prefill_s"] += outs[0].prefill_s
        t["decode_s"] += outs[0].decode_s
        t["prompt_tokens"] += sum(o.prompt_tokens for o in outs)
        for p, o in zip(pieces, outs, strict=True):
            p.tokens, p.finish_reason = o.tokens, o.finish_reason
        if timestamps:  # CTC alignment of each segment's text on its own encoder rows (ref: inference_llm)
            from .ctc import ctc_result

            t0 = time.perf_counter()
            for i, (p, f) in enumerate(zip(pieces, feats, strict=True)):
                text = clean_text(self.tokenizer.decode(p.tokens))
                p.ctc = ctc_result(self.net, enc[i, : f.shape[0]], text, self._ctc_tokenizer(), offset_s=p.start)
            t["timestamps_s"] = t.get("timestamps_s", 0.0) + time.perf_counter() - t0

    def transcribe(
        self,
        audio,
        *,
        sample_rate: int | None = None,
        language: str | None = None,
        hotwords: list[str] | None = None,
        itn: bool = True,
        max_new_tokens: int = 512,
        vad: bool | None = None,
        max_segment_s: float = 30.0,
        batch_size: int = 4,
        repetition_guard: bool = True,
        timestamps: bool = True,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> TranscriptionResult:
        """Transcribe a path, bytes, numpy array (+ sample_rate; default 16 kHz) or `asr.audio.Audio`.

        vad: None (auto) decodes audio up to 30 s in one pass, as the reference does, after checking that it
        holds speech at all; longer audio is cut by Silero VAD into segments of at most `max_segment_s`.
        True always segments by VAD; False never runs VAD (one pass over everything, like the reference).
        Segments are decoded `batch_size` at a time; `repetition_guard` stops degenerate loops.
        timestamps: per-token times by CTC forced alignment when the checkpoint has the CTC head (the ModelScope
        copy); otherwise `result.timestamps` is None and `timestamps_note` says why.
        """
        from .audio import Audio, iter_audio_blocks, load_audio, probe

        t_start = time.perf_counter()
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidOptionError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}; got {max_new_tokens!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 256:
            raise InvalidOptionError(f"batch_size must be an integer in 1..256; got {batch_size!r}")
        if not 5.0 <= max_segment_s <= 60.0:
            raise InvalidOptionError(f"max_segment_s must be between 5 and 60 seconds; got {max_segment_s!r}")
        lang = langs.resolve(language, self.variant)
        ids = self.prompt_ids(language, hotwords, itn)
        t = dict.fromkeys(("audio_decode_s", "features_s", "encoder_s", "adaptor_s", "prefill_s", "decode_s"), 0.0)
        t["prompt_tokens"] = 0
        warnings: list[str] = []

        # 1. audio: in memory, or (long files) streamed twice in blocks so memory does not grow with duration
        streamed = None
        if isinstance(audio, (str, Path)) and vad is not False:
            info = probe(audio)
            if info.duration_s is None or info.duration_s > STREAM_ABOVE_S:
                streamed = str(audio)
        if streamed is None:
            audio_obj = audio if isinstance(audio, Audio) else load_audio(audio, sample_rate)
            t["audio_decode_s"] += audio_obj.decode_s
            warnings += list(getattr(audio_obj, "warnings", []) or [])
            samples = audio_obj.samples
            duration = audio_obj.duration_s
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")

        # 2. plan segments
        if streamed is not None:
            t0 = time.perf_counter()
            stream, chunks, n = self.vad.stream(), [], 0
            for block in iter_audio_blocks(streamed, BLOCK_S):
                if cancel is not None and cancel.is_set():
                    raise TranscriptionCancelled("transcription cancelled")
                chunks.append(stream.feed(block))
                n += block.shape[0]
            chunks.append(stream.flush())
            probs = np.concatenate(chunks)
            duration = n / SAMPLE_RATE
            t["audio_decode_s"] += time.perf_counter() - t0
            plan = self._plan(probs, duration, n, True, max_segment_s)
        elif vad is False:
            plan = [(0.0, duration)]
        else:
            plan = self._plan(self.vad.probabilities(samples), duration, samples.shape[0], bool(vad), max_segment_s)
        if vad is False and duration > SHORT_AUDIO_S:
            warnings.append(f"audio is {duration:.0f} s long and VAD is off; the model is trained on utterances up to "
                            "~30 s and may loop or drop text")
        if not plan:
            warnings.append("no speech detected")
        if progress:
            progress(0.0, duration, f"{len(plan)} segment(s) to decode")

        # 3. decode, batch by batch, in time order
        pieces: list[_Piece] = []
        for batch in self._pieces(plan, streamed, None if streamed else samples, batch_size):
            self._decode_batch(batch, ids, max_new_tokens, repetition_guard, cancel, t,
                               timestamps=timestamps and self.timestamps_available)
            for p in batch:
                p.samples = np.zeros(0, np.float32)  # release audio as we go
            pieces += batch
            if progress:
                progress(min(batch[-1].end, duration), duration, f"{len(pieces)}/{len(plan)} segment(s) transcribed")

        # 4. result
        segments = [Segment(start=round(p.start, 3), end=round(p.end, 3), text=clean_text(self.tokenizer.decode(p.tokens)),
                            token_ids=p.tokens, timestamps=p.ctc.timestamps if p.ctc else None) for p in pieces]
        if timestamps and self.timestamps_available:
            all_ts, note = [ts for s in segments for ts in (s.timestamps or [])], ""
        else:
            all_ts = None
            note = ("timestamps not requested" if not timestamps else
                    "this checkpoint has no CTC head (the Hugging Face copies lack it; the ModelScope copy has it), "
                    "so only segment-level times are given")
        text = " ".join(s.text.strip() for s in segments if s.text.strip()) if len(segments) > 1 else (
            segments[0].text if segments else "")
        finish = "empty" if not pieces else next(
            (r for r in ("repetition", "length") if any(p.finish_reason == r for p in pieces)), "stop")
        if any(p.finish_reason == "length" for p in pieces):
            warnings.append(f"decoding stopped at max_new_tokens={max_new_tokens}; the transcript may be cut short")
        if any(p.finish_reason == "repetition" for p in pieces):
            warnings.append("a repetition loop was detected and cut (repetition_guard)")
        code, source, method = _language_of(lang, text, self.variant)
        total = time.perf_counter() - t_start
        tokens = [tok for p in pieces for tok in p.tokens]
        timings = Timings(
            **{k: v for k, v in t.items() if k != "timestamps_s"}, total_s=total, audio_duration_s=duration, generated_tokens=len(tokens),
            prefill_tokens_per_s=t["prompt_tokens"] / t["prefill_s"] if t["prefill_s"] > 0 else 0.0,
            decode_tokens_per_s=len(tokens) / t["decode_s"] if t["decode_s"] > 0 else 0.0,
            real_time_factor=total / duration if duration > 0 else 0.0,
        )
        return TranscriptionResult(
            text=text, language=code, language_source=source, language_method=method, segments=segments,
            token_ids=tokens, finish_reason=finish, timestamps=all_ts, timestamps_note=note, timings=timings,
            warnings=warnings,
        )

    def _plan(self, probs: np.ndarray, duration: float, num_samples: int, force: bool,
              max_segment_s: float) -> list[tuple[float, float]]:
        from .vad import plan_segments, speech_spans

        spans = speech_spans(probs, num_samples=num_samples)
        if not spans:
            return []
        if not force and duration <= SHORT_AUDIO_S:
            return [(0.0, duration)]
        segs = plan_segments(spans, probs, max_segment_s=max_segment_s, duration_s=duration)
        return [(s.start, s.end) for s in segs]

    def _pieces(self, plan: list[tuple[float, float]], path: str | None, samples: np.ndarray | None,
                batch_size: int):
        """Yield batches of `_Piece`s in time order; for a streamed file, cut them from a second block pass."""
        if samples is not None:
            for i in range(0, len(plan), batch_size):
                yield [_Piece(s, e, samples[int(s * SAMPLE_RATE): int(e * SAMPLE_RATE)])
                       for s, e in plan[i: i + batch_size]]
            return
        from .audio import iter_audio_blocks

        buf, buf_start, k, batch = np.zeros(0, np.float32), 0, 0, []
        for block in iter_audio_blocks(path, BLOCK_S):
            buf = np.concatenate([buf, block])
            while k < len(plan) and int(plan[k][1] * SAMPLE_RATE) <= buf_start + buf.shape[0]:
                s, e = (int(x * SAMPLE_RATE) - buf_start for x in plan[k])
                batch.append(_Piece(plan[k][0], plan[k][1], buf[s:e].copy()))
                k += 1
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            keep_from = int(plan[k][0] * SAMPLE_RATE) - buf_start if k < len(plan) else buf.shape[0]
            keep_from = max(0, min(keep_from, buf.shape[0]))
            buf, buf_start = buf[keep_from:], buf_start + keep_from
        while k < len(plan):  # segments running to the very end
            s, e = (int(x * SAMPLE_RATE) - buf_start for x in plan[k])
            batch.append(_Piece(plan[k][0], plan[k][1], buf[max(0, s):e].copy()))
            k += 1
        if batch:
            yield batch

    def warmup(self) -> None:
        """Run a short dummy utterance so the first real call is not the slow one."""
        rng = np.random.default_rng(0)
        samples = (0.01 * rng.standard_normal(16000)).astype(np.float32)
        t = dict.fromkeys(("features_s", "encoder_s", "adaptor_s", "prefill_s", "decode_s", "prompt_tokens"), 0)
        self._decode_batch([_Piece(0.0, 1.0, samples)], self.prompt_ids(), 2, False, None, t)


def _language_of(lang: Language | None, text: str, variant: str) -> tuple[str | None, str, str | None]:
    if lang is not None:
        return lang.code, "requested", None
    code = langs.detect_from_text(text, variant)
    return (code, "detected", "script-heuristic") if code else (None, "unknown", "script-heuristic")


# --- loading -------------------------------------------------------------------------------------------
def _normalize_dtype(dtype: str) -> str:
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d == "auto":
        # bf16 halves memory and is fast on GPUs; MLX's CPU backend has no fast bf16 kernels (bf16 decoding is
        # ~2x and prefill ~14x slower than fp32 there, docs/performance.md), so CPUs compute in fp32
        return "float32" if mx.default_device() == mx.cpu else "bfloat16"
    if d not in DTYPES:
        raise InvalidOptionError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return d


def _detect_variant(name: str, explicit: str | None) -> str:
    if explicit:
        v = explicit.lower()
        if v not in ("nano", "mlt"):
            raise InvalidOptionError(f"variant {explicit!r} is not supported; use 'nano' or 'mlt'")
        return v
    return "mlt" if "mlt" in name.lower() else "nano"


def load_model(
    path_or_repo: str | None = None,
    *,
    dtype: str = "auto",
    quantize: int | None = None,
    variant: str | None = None,
    encoder_dtype: str = "float32",
    warmup: bool = False,
) -> FunASRNano:
    """Load a model from an official directory, a Hugging Face repo id, or a converted directory.

    dtype: the LLM's compute dtype: "auto" (bfloat16 on a GPU, float32 on a CPU, where MLX has no fast bf16
    kernels), "bfloat16", "float32" (the parity dtype) or "float16". encoder_dtype: the audio encoder's
    (float32 default; bfloat16 is faster on GPUs; never float16, whose range the adaptor overflows).
    quantize: 4 or 8 to quantize the LLM's linear layers and embeddings (cached after the first time).
    """
    dtype = _normalize_dtype(dtype)
    encoder_dtype = _normalize_dtype(encoder_dtype)
    if encoder_dtype == "float16":
        raise InvalidOptionError("encoder_dtype float16 is not supported: the audio path overflows fp16; use bfloat16")
    if quantize not in (None, 4, 8):
        raise InvalidOptionError(f"quantize must be 4, 8 or None; got {quantize!r}")
    from . import backend

    for message in backend.check():
        log.warning(message)
    src = ckpt.resolve(path_or_repo)
    if src.kind == "official":
        conv = ckpt.converted_dir_for(src.path)
        if not (conv / ckpt.MLX_CONFIG).is_file():
            log.info("converting %s to MLX (once) ...", src.path)
            convert(src.path, conv, _detect_variant(src.name, variant))
        model_dir = conv
    else:
        model_dir = src.path
    try:
        raw = json.loads((model_dir / ckpt.MLX_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {model_dir / ckpt.MLX_CONFIG}: {exc}") from exc
    cfg = ModelConfig.from_json(raw)
    if variant:
        cfg = ModelConfig(**{**cfg.__dict__, "variant": _detect_variant(src.name, variant)})
    elif src.kind == "converted" and "mlt" in src.name.lower():
        cfg = ModelConfig(**{**cfg.__dict__, "variant": "mlt"})
    net = _load_net(model_dir, cfg, dtype, encoder_dtype, quantize)
    tokenizer = PromptTokenizer(model_dir / "tokenizer.json")
    model = FunASRNano(net, cfg, tokenizer, name=src.name, dtype=dtype, quantization=quantize,
                       encoder_dtype=encoder_dtype, model_dir=model_dir)
    if warmup:
        model.warmup()
    return model


def _load_net(model_dir: Path, cfg: ModelConfig, dtype: str, encoder_dtype: str, quantize: int | None) -> FunASRNanoNet:
    path = model_dir / ckpt.MLX_WEIGHTS
    try:
        weights = mx.load(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; delete the directory to convert again") from exc
    net = FunASRNanoNet(cfg)
    _strict_check({k: tuple(v.shape) for k, v in weights.items()},
                  {k: tuple(v.shape) for k, v in tree_flatten(net.parameters())}, str(path))
    cast = {}
    for k, v in weights.items():
        if k.startswith("llm."):
            cast[k] = v.astype(DTYPES[dtype])
        elif k.startswith("encoder."):
            cast[k] = v.astype(DTYPES[encoder_dtype])
        else:
            cast[k] = v.astype(mx.float32)
    net.load_weights(list(cast.items()), strict=True)
    if quantize:
        _quantize_llm(net, model_dir, quantize)
    mx.eval(net.parameters())
    net.eval()
    return net


def _quantize_llm(net: FunASRNanoNet, model_dir: Path, bits: int, group_size: int = 64) -> None:
    """Quantize the LLM (mlx-lm style affine quantization); cache the result next to the weights."""
    dtype = str(net.llm.model.norm.weight.dtype).split(".")[-1]
    qpath = model_dir / f"llm-q{bits}g{group_size}-{dtype}.safetensors"
    nn.quantize(net.llm, group_size=group_size, bits=bits)
    if qpath.is_file():
        try:
            net.llm.load_weights(str(qpath), strict=True)
            return
        except Exception as exc:
            raise ModelLoadError(f"quantized cache {qpath} is unreadable ({exc}); delete it and load again") from exc
    tmp = qpath.with_suffix(".tmp.safetensors")
    mx.save_safetensors(str(tmp), dict(tree_flatten(net.llm.parameters())))
    tmp.replace(qpath)


__all__ = ["FunASRNano", "ModelConfig", "load_model", "convert", "ModelLoadError", "TranscriptionCancelled"]
