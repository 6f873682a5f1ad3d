"""Fun-ASR-Nano on MLX: a loaded model and `transcribe` (segments, batching, results).

Pipeline (ref: funasr/models/fun_asr_nano/model.py::inference / inference_prepare / inference_llm):
audio (asr.audio.io) -> fbank + LFR (asr.audio.features) -> SAN-M encoder -> adaptor (the runtime's audio runner)
-> first ceil(L/8) rows spliced into the ChatML prompt (asr.model.prompt) -> Qwen3 greedy decoding (the runtime's
LLM runner through asr.decode.loop) -> text cleanup. Long audio is cut into segments by VAD (asr.audio.vad).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import languages as langs
from .audio.features import audio_token_count, features, features_padded
from .audio.io import (
    SAMPLE_RATE,
    STREAM_ABOVE_S,
    Audio,
    AudioFile,
    decode_or_stream,
    iter_audio_blocks,
    load_audio,
)
from .audio.vad import SileroVAD, plan_segments, speech_spans
from .decode.loop import greedy
from .decode.runner import Runtime
from .errors import InvalidOptionError, TranscriptionCancelled
from .model.config import ModelConfig
from .model.ctc import CTCTokenizer, ctc_result
from .model.network import FunASRNanoNet
from .model.prompt import PromptIds, PromptTokenizer, clean_hotwords, clean_text, instruction
from .options import parse_speakers
from .speaker.cluster import DIARIZATION
from .speaker.cluster import cluster as cluster_speakers
from .speaker.diarize import EMBED_BATCH, diarize_spans, sample_index, span_samples, speaker_of
from .types import BATCH_SIZE_DEFAULT, BATCH_SIZE_MAX, Language, Segment, Timings, TranscriptionResult

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 4096
ProgressFn = Callable[[float, float, str], None]


# --- the model -----------------------------------------------------------------------------------------
SHORT_AUDIO_S = 30.0  # up to this, audio is decoded in one pass like the reference (VAD only checks for speech)
BLOCK_S = 60.0


@dataclass
class _Piece:
    """A segment to decode: times in the original audio, and its samples."""

    start: float
    end: float
    samples: np.ndarray
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "stop"
    ctc: object | None = None  # asr.ctc.CTCResult when token timestamps were computed
    speaker: int | None = None  # the turn's speaker (diarization), numbered from 0 by first appearance


class FunASRNano:
    """A loaded model. Thread-affine under MLX: load it and call it from one thread."""

    def __init__(self, net: FunASRNanoNet, cfg: ModelConfig, tokenizer: PromptTokenizer, runtime: Runtime, *,
                 name: str, dtype: str, quantization: int | None, encoder_dtype: str, model_dir: Path):
        self.net = net
        self.runtime = runtime  # the runners, chosen at load (asr.backends.select)
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
        # who spoke when: a speaker runner (`embed_windows(list of 16 kHz windows) -> [N, D]`, e.g. CAM++ from
        # asr.loading.speaker), given at load (load_model(speaker_model=...)); None: no diarization
        self.speaker_model = None

    # ---- properties the server reads
    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def special_tokens(self) -> frozenset[str]:
        """The tokenizer's special tokens, which hotwords may not contain."""
        return self.tokenizer.special_tokens

    @property
    def languages(self) -> list[Language]:
        return langs.languages(self.variant)

    @property
    def has_ctc(self) -> bool:
        return self.cfg.ctc is not None

    @property
    def timestamps_available(self) -> bool:
        return self.has_ctc and (self.model_dir / "multilingual.tiktoken").is_file()

    def _ctc_tokenizer(self) -> CTCTokenizer:
        if self._ctc_tok is None:
            self._ctc_tok = CTCTokenizer.from_file(self.model_dir / "multilingual.tiktoken")
        return self._ctc_tok

    @property
    def vad(self) -> SileroVAD:
        if self._vad is None:
            self._vad = SileroVAD.load()
        return self._vad

    # ---- stages (public for parity tests and benchmarks)
    def features(self, samples: np.ndarray | mx.array) -> mx.array:
        return features(mx.array(samples), self.cfg.frontend)

    def encode(self, feats: mx.array, lengths: mx.array | None = None) -> mx.array:
        """[L, 560] -> [L, 512], or batched [B, L, 560] with lengths -> [B, L, 512] (fp32)."""
        x = feats if feats.ndim == 3 else feats[None]
        out = self.runtime.audio.encode(x, lengths)
        return out if feats.ndim == 3 else out[0]

    def adapt(self, enc: mx.array, lengths: mx.array | None = None) -> mx.array:
        x = enc if enc.ndim == 3 else enc[None]
        out = self.runtime.audio.adapt(x, lengths)
        return out if enc.ndim == 3 else out[0]

    def prompt_ids(self, language: str | None = None, hotwords: list[str] | None = None, itn: bool = True) -> PromptIds:
        lang = langs.resolve(language, self.variant)
        key = (lang.prompt_name if lang else None, tuple(clean_hotwords(hotwords, self.tokenizer.special_tokens)),
               bool(itn))
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.tokenizer.prompt_ids(instruction(list(key[1]), key[0], key[2]))
        return self._prompt_cache[key]

    def prompt_embeddings(self, audio_rows: mx.array, ids: PromptIds) -> mx.array:
        """[1, P, D]: embeddings of the prefix | audio rows | suffix (ref: inference_prepare)."""
        return self.prompt_batch(audio_rows[None], [audio_rows.shape[0]], ids)[0]

    def prompt_batch(self, rows: mx.array, counts: list[int], ids: PromptIds) -> tuple[mx.array, list[int]]:
        """Several prompts at once, left-padded with zeros into [B, P, D]: row b is the prefix embeddings | its
        first counts[b] audio rows of `rows` [B, R, D] | the suffix embeddings; and each prompt's length.

        One gather from a table of [zero row | prefix and suffix embeddings | every audio row], whatever B is."""
        emb = self.net.llm.model.embed_tokens
        dt = self.runtime.llm.embeds_dtype
        B, R, D = rows.shape
        n_pre, n_suf = len(ids.prefix), len(ids.suffix)
        text = emb(mx.array(ids.prefix + ids.suffix, dtype=mx.int32)).astype(dt)
        table = mx.concatenate([mx.zeros((1, D), dtype=dt), text, rows.reshape(B * R, D).astype(dt)], axis=0)
        lengths = [n_pre + c + n_suf for c in counts]
        P = max(lengths)
        idx = np.zeros((B, P), dtype=np.int32)  # 0: the zero row (left padding)
        for b, c in enumerate(counts):
            start = P - lengths[b]
            idx[b, start: start + n_pre] = 1 + np.arange(n_pre)
            idx[b, start + n_pre: start + n_pre + c] = 1 + n_pre + n_suf + b * R + np.arange(c)
            idx[b, start + n_pre + c:] = 1 + n_pre + np.arange(n_suf)
        return mx.take(table, mx.array(idx), axis=0), lengths

    # ---- a batch of segments
    def batch_prompts(self, samples: list[np.ndarray], ids: PromptIds,
                      t: dict | None = None) -> tuple[mx.array, list[int], mx.array, list[int]]:
        """Features, encoder, adaptor and prompts of several segments in one padded pass: (prompts [B, P, D], their
        lengths, the encoder output [B, L, D_enc], the feature lengths). With `t`, each stage is evaluated and its
        time added to t["features_s" | "encoder_s" | "adaptor_s"]; without, nothing is evaluated."""
        clock = [time.perf_counter()]

        def stage(name: str, value):
            if t is not None:
                mx.eval(value)
                now = time.perf_counter()
                t[name] += now - clock[0]
                clock[0] = now
            return value

        feats, lengths = stage("features_s", features_padded(samples, self.cfg.frontend))
        valid = mx.array(lengths) if len(samples) > 1 else None  # one utterance: no padding
        enc = stage("encoder_s", self.encode(feats, valid))
        prompts, prompt_lengths = stage("adaptor_s", self.prompt_batch(
            self.adapt(enc, valid), [audio_token_count(n) for n in lengths], ids))
        return prompts, prompt_lengths, enc, lengths

    def _decode_batch(self, pieces: list[_Piece], ids: PromptIds, max_new_tokens: int, repetition_guard: bool,
                      cancel: threading.Event | None, t: dict, timestamps: bool = False) -> None:
        prompts, prompt_lengths, enc, lengths = self.batch_prompts([p.samples for p in pieces], ids, t)
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        outs = greedy(self.runtime.llm, prompts, prompt_lengths, eos_ids=self.eos_ids, max_new_tokens=max_new_tokens,
                      cancel=cancel, repetition_guard=repetition_guard)
        t["prefill_s"] += outs[0].prefill_s
        t["decode_s"] += outs[0].decode_s
        t["prompt_tokens"] += sum(o.prompt_tokens for o in outs)
        for p, o in zip(pieces, outs, strict=True):
            p.tokens, p.finish_reason = o.tokens, o.finish_reason
            p.text = clean_text(self.tokenizer.decode(p.tokens))
        if timestamps:  # CTC alignment of each segment's text on its own encoder rows (ref: inference_llm)
            t0 = time.perf_counter()
            for i, (p, n) in enumerate(zip(pieces, lengths, strict=True)):
                p.ctc = ctc_result(self.net, enc[i, :n], p.text, self._ctc_tokenizer(), offset_s=p.start,
                                   decoder=self.runtime.audio.ctc_decode)
            t["timestamps_s"] += time.perf_counter() - t0

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
        batch_size: int = BATCH_SIZE_DEFAULT,
        repetition_guard: bool = True,
        timestamps: bool = True,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        max_duration_s: float | None = None,
        on_segment: Callable[[Segment], None] | None = None,
        speakers: int | str | None = None,
    ) -> TranscriptionResult:
        """Transcribe a path, an opened `asr.audio.AudioFile`, bytes, a numpy array (+ sample_rate; default 16 kHz)
        or `asr.audio.Audio`. A path is opened once and every pass reads that descriptor.

        vad: None (auto) decodes audio up to 30 s in one pass, as the reference does, after checking that it
        holds speech at all; longer audio is cut by Silero VAD into segments of at most `max_segment_s`.
        True always segments by VAD; False never runs VAD (one pass over everything, like the reference).
        Segments are decoded `batch_size` at a time (decoding reads every weight once a step, whatever the batch:
        10 minutes of dense speech took half the time at 16 as at 4 on an H200; 2 minutes on the 2-core CPU 21.5 s at
        16, 26.2 s at 4 and 34.4 s at 1, docs/performance.md); `repetition_guard` stops degenerate loops.
        timestamps: per-token times by CTC forced alignment when the checkpoint has the CTC head (the ModelScope
        copy); otherwise `result.timestamps` is None and `timestamps_note` says why.
        max_duration_s: refuse audio longer than this (AudioTooLargeError), from the header where it says, else
        while decoding, so that neither memory nor time grows past it.
        on_segment: called with each segment, in time order, as soon as its batch is decoded (for streaming front
        ends); the result holds the same segments.
        speakers: None (no diarization), "auto" (find how many) or a number of speakers: segments are cut at the
        turns found by the speaker model given at load (asr.speaker.diarize: the official windows, clustering and
        post-processing) and each carries its `speaker` ('S1', 'S2', ...). Long files too: a streamed file is read once
        more for the speaker windows, and only their embeddings are held.
        """
        t_start = time.perf_counter()
        _check_options(max_new_tokens, batch_size, max_segment_s)
        lang = langs.resolve(language, self.variant)
        ids = self.prompt_ids(language, hotwords, itn)
        num_speakers = self._check_speakers(speakers)
        t = _stage_times()
        warnings: list[str] = []

        with contextlib.ExitStack() as stack:
            if isinstance(audio, (str, os.PathLike)):  # opened once: every pass reads this descriptor
                audio = stack.enter_context(AudioFile.open(audio))
            pieces, duration, decode_warnings = self._decode_audio(
                audio, sample_rate, vad, max_segment_s, max_duration_s, batch_size, ids, max_new_tokens,
                repetition_guard, timestamps, progress, cancel, t, on_segment, speakers, num_speakers)
        warnings += decode_warnings

        return self._result(pieces, duration, warnings, lang, max_new_tokens, timestamps, t,
                            time.perf_counter() - t_start)

    def _result(self, pieces: list[_Piece], duration: float, warnings: list[str], lang: Language | None,
                max_new_tokens: int, timestamps: bool, t: dict, total: float) -> TranscriptionResult:
        """Step 4 of transcribe: the decoded pieces of one audio as its result."""
        warnings = list(warnings)
        segments = [_segment(p) for p in pieces]
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
        tokens = [tok for p in pieces for tok in p.tokens]
        timings = Timings(
            **t, total_s=total, audio_duration_s=duration, generated_tokens=len(tokens),
            prefill_tokens_per_s=t["prompt_tokens"] / t["prefill_s"] if t["prefill_s"] > 0 else 0.0,
            decode_tokens_per_s=len(tokens) / t["decode_s"] if t["decode_s"] > 0 else 0.0,
            real_time_factor=total / duration if duration > 0 else 0.0,
        )
        return TranscriptionResult(
            text=text, language=code, language_source=source, language_method=method, segments=segments,
            token_ids=tokens, finish_reason=finish, timestamps=all_ts, timestamps_note=note, timings=timings,
            runtime=self.runtime.info, warnings=warnings,
        )

    def transcribe_many(
        self,
        audios: list,
        *,
        language: str | None = None,
        hotwords: list[str] | None = None,
        itn: bool = True,
        max_new_tokens: int = 512,
        max_segment_s: float = 30.0,
        batch_size: int = BATCH_SIZE_DEFAULT,
        repetition_guard: bool = True,
        timestamps: bool = True,
        cancel: threading.Event | None = None,
        on_segment: Callable[[int, Segment], None] | None = None,
    ) -> list[TranscriptionResult]:
        """Transcribe several audios with the same options, their segments decoded together in batches of
        `batch_size` (short clips fill a batch together: a decode step reads every weight once, whatever the batch).

        Each item is what `transcribe` takes, decoded in memory (`asr.audio.Audio`, an array at 16 kHz, bytes, a path
        or an AudioFile of up to STREAM_ABOVE_S). Each result holds exactly what `transcribe` gives for that audio
        alone with vad=None - the same segments and, batch for batch, the same tokens (a batch row is computed as
        if alone: padding is masked) - but its stage times are the shared pass's, split by each audio's share of the
        segments' duration, and its total_s is the whole call's. `on_segment(i, segment)` is called as soon as audio
        i's segment and every earlier one of audio i are decoded (so in time order per audio).
        """
        t_start = time.perf_counter()
        _check_options(max_new_tokens, batch_size, max_segment_s)
        lang = langs.resolve(language, self.variant)
        ids = self.prompt_ids(language, hotwords, itn)
        t = _stage_times()
        owned: list[tuple[int, _Piece]] = []
        durations, warnings = [], []
        for i, audio in enumerate(audios):
            with contextlib.ExitStack() as stack:
                if isinstance(audio, (str, os.PathLike)):
                    audio = stack.enter_context(AudioFile.open(audio))
                a = audio if isinstance(audio, Audio) else load_audio(audio, max_duration_s=STREAM_ABOVE_S)
            t["audio_decode_s"] += a.decode_s
            durations.append(a.duration_s)
            warnings.append(list(getattr(a, "warnings", []) or []))
            plan = self._plan(self.vad.probabilities(a.samples, robust=True), a.duration_s, a.samples.shape[0],
                              False, max_segment_s)
            if not plan:
                warnings[i].append("no speech detected")
            owned += [(i, p) for batch in self._pieces(plan, None, a.samples, len(plan) or 1) for p in batch]
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        # longest first: rows of a batch then have similar lengths (less padding); each audio keeps its own order
        order = sorted(range(len(owned)), key=lambda k: -owned[k][1].samples.shape[0])
        done = [False] * len(owned)
        per_audio = [[k for k, (j, _) in enumerate(owned) if j == i] for i in range(len(audios))]
        emitted = [0] * len(audios)
        for k in range(0, len(order), batch_size):
            batch = order[k: k + batch_size]
            self._decode_batch([owned[j][1] for j in batch], ids, max_new_tokens, repetition_guard, cancel, t,
                               timestamps=timestamps and self.timestamps_available)
            for j in batch:
                owned[j][1].samples = np.zeros(0, np.float32)
                done[j] = True
            if on_segment is not None:
                for i, ks in enumerate(per_audio):
                    while emitted[i] < len(ks) and done[ks[emitted[i]]]:
                        on_segment(i, _segment(owned[ks[emitted[i]]][1]))
                        emitted[i] += 1
        total = time.perf_counter() - t_start
        seconds = [sum(p.end - p.start for j, p in owned if j == i) for i in range(len(audios))]
        whole = sum(seconds) or 1.0
        results = []
        for i in range(len(audios)):
            share = seconds[i] / whole
            ti = {k: (v * share if k != "audio_decode_s" else v / len(audios)) for k, v in t.items()}
            ti["prompt_tokens"] = int(round(t["prompt_tokens"] * share))
            results.append(self._result([p for j, p in owned if j == i], durations[i], warnings[i], lang,
                                        max_new_tokens, timestamps, ti, total))
        return results

    def _decode_audio(self, audio, sample_rate, vad, max_segment_s, max_duration_s, batch_size, ids, max_new_tokens,
                      repetition_guard, timestamps, progress, cancel, t, on_segment=None, speakers=None,
                      num_speakers=None) -> tuple[list[_Piece], float, list[str]]:
        """Steps 1-3 of transcribe: the audio (in memory, or a file streamed twice in blocks so that memory does not
        grow with its length), the segment plan, and every segment decoded, batch by batch in time order."""
        warnings: list[str] = []
        # 1. audio: in memory, or (long files) streamed twice in blocks so memory does not grow with duration
        streamed = None
        if isinstance(audio, AudioFile) and vad is not False:  # no trustworthy length, or a long one: stream it
            got = decode_or_stream(audio, max_duration_s)
            if isinstance(got, AudioFile):
                streamed = got
            else:
                audio = got
        if streamed is None:
            audio_obj = audio if isinstance(audio, Audio) else load_audio(audio, sample_rate,
                                                                          max_duration_s=max_duration_s)
            t["audio_decode_s"] += audio_obj.decode_s
            warnings += list(getattr(audio_obj, "warnings", []) or [])
            samples = audio_obj.samples
            duration = audio_obj.duration_s
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")

        # 2. plan segments
        if streamed is not None:
            t0 = time.perf_counter()
            stream, chunks, n = self.vad.stream(robust=True), [], 0
            for block in iter_audio_blocks(streamed, BLOCK_S, max_duration_s=max_duration_s):
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
            plan = self._plan(self.vad.probabilities(samples, robust=True), duration, samples.shape[0], bool(vad),
                              max_segment_s)
        if vad is False and duration > SHORT_AUDIO_S:
            warnings.append(f"audio is {duration:.0f} s long and VAD is off; the model is trained on utterances up to "
                            "~30 s and may loop or drop text")
        if not plan:
            warnings.append("no speech detected")
        owners: list[int | None] = [None] * len(plan)
        if speakers is not None and plan:
            t0 = time.perf_counter()
            plan, owners = _cut_at_turns(plan, self._diarize(plan, streamed, None if streamed else samples,
                                                             duration, num_speakers, progress, cancel))
            t["speakers_s"] += time.perf_counter() - t0
        if progress:
            progress(0.0, duration, f"{len(plan)} segment(s) to decode")

        # 3. decode, batch by batch, in time order
        pieces: list[_Piece] = []
        for batch in self._pieces(plan, streamed, None if streamed else samples, batch_size, cancel):
            for i, p in enumerate(batch):  # pieces come in plan order: each takes its planned segment's speaker
                p.speaker = owners[len(pieces) + i]
            self._decode_batch(batch, ids, max_new_tokens, repetition_guard, cancel, t,
                               timestamps=timestamps and self.timestamps_available)
            for p in batch:
                p.samples = np.zeros(0, np.float32)  # release audio as we go
                if on_segment is not None:
                    on_segment(_segment(p))
            pieces += batch
            if progress:
                progress(min(batch[-1].end, duration), duration, f"{len(pieces)}/{len(plan)} segment(s) transcribed")

        return pieces, duration, warnings

    def _diarize(self, plan, streamed: AudioFile | None, samples: np.ndarray | None, duration: float,
                 num_speakers: int | None, progress: ProgressFn | None, cancel: threading.Event | None) -> list:
        """Speaker turns over the planned segments (asr.speaker.diarize): from the samples in memory, or for a
        streamed file from one more pass over its blocks (only the embeddings are kept, not the audio)."""
        if streamed is not None:
            spans = _stream_spans(streamed, plan, sample_index, cancel)
        else:
            spans = span_samples(plan, samples)

        def on_span(end: float) -> None:
            if cancel is not None and cancel.is_set():
                raise TranscriptionCancelled("transcription cancelled")
            if progress:
                progress(0.0, duration, f"finding speakers: {end:.0f} of {duration:.0f} s")

        return diarize_spans(spans, self.speaker_model.embed_windows,
                             functools.partial(cluster_speakers, options=DIARIZATION, random_state=0), num_speakers,
                             on_span=on_span,
                             batch=getattr(self.speaker_model, "batch", EMBED_BATCH))

    def _plan(self, probs: np.ndarray, duration: float, num_samples: int, force: bool,
              max_segment_s: float) -> list[tuple[float, float]]:
        spans = speech_spans(probs, num_samples=num_samples)
        if not spans:
            return []
        if not force and duration <= SHORT_AUDIO_S:
            return [(0.0, duration)]
        segs = plan_segments(spans, probs, max_segment_s=max_segment_s, duration_s=duration)
        return [(s.start, s.end) for s in segs]

    def _pieces(self, plan: list[tuple[float, float]], path: AudioFile | None, samples: np.ndarray | None,
                batch_size: int, cancel: threading.Event | None = None):
        """Yield batches of `_Piece`s in time order; for a streamed file, cut them from a second block pass."""
        if samples is not None:
            for i in range(0, len(plan), batch_size):
                yield [_Piece(s, e, samples[int(s * SAMPLE_RATE): int(e * SAMPLE_RATE)])
                       for s, e in plan[i: i + batch_size]]
            return
        batch = []
        for start, end, data in _stream_spans(path, plan, lambda x: int(x * SAMPLE_RATE), cancel):
            batch.append(_Piece(start, end, data))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _check_speakers(self, speakers: int | str | None) -> int | None:
        """The number of speakers asked for (None: find it), after checking `speakers` and the speaker model."""
        speakers = parse_speakers(speakers)
        if speakers is None:
            return None
        if self.speaker_model is None:
            raise InvalidOptionError("speakers= needs a speaker model: load_model(..., speaker_model="
                                     "'iic/speech_campplus_sv_zh-cn_16k-common' or its local folder)")
        return None if speakers == "auto" else speakers

    def warmup(self, batch_size: int = BATCH_SIZE_DEFAULT) -> None:
        """Run a short dummy utterance, then a batch of two, so that neither the first short call nor the first
        long one (whose segments are decoded in batches) is the slow one. On CUDA, also a batch for each kernel
        the one-launch batched step compiles for batches up to `batch_size` (one per row tile, ~1.4 s each on an
        H200 at first use; the LLM runner's warm_batches)."""
        rng = np.random.default_rng(0)
        samples = (0.01 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32)
        clips = [samples, samples[: SAMPLE_RATE // 2]]  # batches alternate them: rows of two prompt lengths
        ids = self.prompt_ids()
        for n in sorted({1, 2, *self.runtime.llm.warm_batches(batch_size)}):
            pieces = [_Piece(float(i), i + clips[i % 2].shape[0] / SAMPLE_RATE, clips[i % 2]) for i in range(n)]
            self._decode_batch(pieces, ids, 2, False, None, _stage_times())


def _stream_spans(path: AudioFile, spans: list[tuple[float, float]], index: Callable[[float], int],
                  cancel: threading.Event | None = None):
    """Yield (start, end, samples[index(start):index(end)]) for each span of a file, from one pass over its blocks;
    only the audio from the next span's start on is held. The spans must start in time order (a plan's do);
    `cancel` is checked at every block."""
    if any(b[0] < a[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise ValueError("spans to stream must start in time order")
    buf, buf_start, k = np.zeros(0, np.float32), 0, 0
    for block in iter_audio_blocks(path, BLOCK_S):
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        buf = np.concatenate([buf, block])
        while k < len(spans) and index(spans[k][1]) <= buf_start + buf.shape[0]:
            s, e = (index(x) - buf_start for x in spans[k])
            yield spans[k][0], spans[k][1], buf[s:e].copy()
            k += 1
        keep_from = index(spans[k][0]) - buf_start if k < len(spans) else buf.shape[0]
        keep_from = max(0, min(keep_from, buf.shape[0]))
        buf, buf_start = buf[keep_from:], buf_start + keep_from
    while k < len(spans):  # spans running to the very end
        s, e = (index(x) - buf_start for x in spans[k])
        yield spans[k][0], spans[k][1], buf[max(0, s):e].copy()
        k += 1


MIN_PIECE_S = 0.3  # a cut at a turn never leaves a sliver shorter than this (it joins its neighbour)


def _cut_at_turns(plan: list[tuple[float, float]], turns: list) -> tuple[list[tuple[float, float]], list[int | None]]:
    """Each planned segment cut at the speaker turns inside it, so that a segment has one speaker; the speaker of
    each piece is the one with the most overlap (the official distribute_spk)."""
    out: list[tuple[float, float]] = []
    for start, end in plan:
        cuts = [start, *sorted(tt.start for tt in turns if start + MIN_PIECE_S < tt.start < end - MIN_PIECE_S), end]
        bounds = [cuts[0]]
        for c in cuts[1:-1]:
            if c - bounds[-1] >= MIN_PIECE_S:
                bounds.append(c)
        bounds.append(end)
        out += [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    return out, [speaker_of(a, b, turns) if turns else None for a, b in out]


def _check_options(max_new_tokens: int, batch_size: int, max_segment_s: float) -> None:
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidOptionError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}; got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= BATCH_SIZE_MAX:
        raise InvalidOptionError(f"batch_size must be an integer in 1..{BATCH_SIZE_MAX}; got {batch_size!r}")
    if not 5.0 <= max_segment_s <= 60.0:
        raise InvalidOptionError(f"max_segment_s must be between 5 and 60 seconds; got {max_segment_s!r}")


def _segment(p: _Piece) -> Segment:
    return Segment(start=round(p.start, 3), end=round(p.end, 3), text=p.text, token_ids=p.tokens,
                   timestamps=p.ctc.timestamps if p.ctc else None,
                   speaker=None if p.speaker is None else f"S{p.speaker + 1}")


def _stage_times() -> dict:
    """Per-stage accumulators, named like the `Timings` fields they fill."""
    return {**dict.fromkeys(("audio_decode_s", "features_s", "encoder_s", "adaptor_s", "prefill_s", "decode_s",
                             "timestamps_s", "speakers_s"), 0.0), "prompt_tokens": 0}


def _language_of(lang: Language | None, text: str, variant: str) -> tuple[str | None, str, str | None]:
    if lang is not None:
        return lang.code, "requested", None
    code = langs.detect_from_text(text, variant)
    return (code, "detected", "script-heuristic") if code else (None, "unknown", "script-heuristic")
