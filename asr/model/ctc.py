"""CTC branch: greedy CTC text and per-token timestamps by CTC forced alignment.

Only for checkpoints that carry the CTC tensors (ModelScope Fun-ASR-Nano: `ctc_decoder.*`, `ctc.ctc_lo.*`).
Pipeline (ref: funasr/models/fun_asr_nano/model.py::inference_llm): encoder output [L, 512] -> ctc_decoder
(Transformer adaptor, adaptor.py) -> ctc_lo -> log_softmax [L, V]; greedy text = argmax, unique_consecutive, drop
blank, decode; timestamps = forced alignment of a text's CTC token ids to the log-probs, one entry per token,
frame k = k * 60 ms.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from pathlib import Path

import mlx.core as mx
import numpy as np
import regex

from ..errors import InvalidOptionError, ModelLoadError
from ..types import TokenTimestamp

Decoder = Callable[[mx.array, mx.array | None], mx.array]  # [B, L, De] features, lengths -> the CTC decoder's output
FRAME_MS = 60  # one encoder frame = LFR 6 x 10 ms (ref: inference_llm, `* 6 * 10 / 1000`)
NOSPEECH = "<|nospeech|>"

# --- tokenizer (ref: funasr/models/sense_voice/whisper_lib/tokenizer.py::get_encoding, Tokenizer) -------------------
# Special tokens follow the BPE ranks, in this order; ids are len(ranks) + position.
_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml "
    "cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am "
    "yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue minnan wuyu dialect zh/en en/zh"
).split()
_AUDIO_EVENTS = "ASR AED SER Speech /Speech BGM /BGM Laughter /Laughter Applause /Applause".split()
_EMOTIONS = "HAPPY SAD ANGRY NEUTRAL".split()
_TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def special_tokens() -> list[str]:
    """The SenseVoice special tokens (1,679) in id order."""
    return [
        "<|endoftext|>", "<|startoftranscript|>",
        *(f"<|{x}|>" for x in (*_LANGUAGES, *_AUDIO_EVENTS, *_EMOTIONS, *_TASKS)),
        *(f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, 51)),
        *(f"<|{i * 0.02:.2f}|>" for i in range(1501)),
    ]


class CTCTokenizer:
    """Byte-level BPE over `multilingual.tiktoken` (what tiktoken does), with SenseVoice's special tokens.

    encode: text -> ids, special-token strings encoded as plain text (the official `disallowed_special=()`).
    decode: ids -> text; timestamp tokens (>= <|0.00|>) are dropped, invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self, ranks: dict[bytes, int]):
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ModelLoadError("CTC vocabulary: ranks must be 0..n-1 without gaps")
        self.ranks = ranks
        self.specials = {s: n + i for i, s in enumerate(special_tokens())}
        self._bytes: list[bytes] = [b""] * n
        for b, r in ranks.items():
            self._bytes[r] = b
        self._bytes += [s.encode("utf-8") for s in self.specials]
        self.n_vocab = len(self._bytes)
        self.timestamp_begin = self.specials["<|0.00|>"]
        self.no_speech = self.specials[NOSPEECH]
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_file(cls, path: str | Path) -> CTCTokenizer:
        """Read a `.tiktoken` file (one `base64(token) rank` per line)."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in lines if ln)}
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the CTC vocabulary {path}: {exc}") from exc
        return cls(ranks)

    def _bpe_uncached(self, piece: bytes) -> tuple[int, ...]:
        # merge the adjacent pair of lowest rank (leftmost on ties) until no pair is a token (tiktoken _byte_pair_merge)
        parts = [piece[i: i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return tuple(self.ranks[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: as tiktoken, round-trip through UTF-16 with replacement
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        for piece in _PATTERN.findall(text):
            b = piece.encode("utf-8")
            r = self.ranks.get(b)
            if r is not None:
                ids.append(r)
            else:
                ids.extend(self._bpe(b))
        return ids

    def decode(self, ids) -> str:
        out = []
        for t in ids:
            t = int(t)
            if t >= self.timestamp_begin:
                continue
            if t < 0:
                raise ValueError(f"invalid CTC token id {t}")
            out.append(self._bytes[t])
        return b"".join(out).decode("utf-8", errors="replace")


# --- network --------------------------------------------------------------------------------------------------------
def _check(net) -> None:
    if getattr(net, "ctc_decoder", None) is None or getattr(net, "ctc_lo", None) is None:
        raise InvalidOptionError("timestamps need the CTC branch, which this checkpoint lacks (the Hugging Face "
                                 "model.pt has no ctc_decoder/ctc.ctc_lo tensors; the ModelScope one has them)")


def ctc_log_probs(net, enc_out: mx.array, lengths: mx.array | None = None, decoder: Decoder | None = None) -> mx.array:
    """[L, De] -> [L, V] (or [B, L, De] + lengths -> [B, L, V]): log_softmax(ctc_lo(ctc_decoder(enc))), fp32.

    decoder: runs the CTC decoder (default `net.ctc_decoder`; a backend's runner of the same weights).
    Ref: model.py::inference_llm (`self.ctc_decoder(encoder_out, ...)`, `self.ctc.log_softmax`), ctc.py::CTC.
    """
    _check(net)
    x = enc_out if enc_out.ndim == 3 else enc_out[None]
    h = net.ctc_lo((decoder or net.ctc_decoder)(x.astype(mx.float32), lengths))
    lp = h - mx.logsumexp(h, axis=-1, keepdims=True)
    return lp if enc_out.ndim == 3 else lp[0]


def ctc_greedy_ids(log_probs, blank: int) -> list[int]:
    """argmax per frame, unique_consecutive, blanks dropped."""
    best = np.asarray(mx.argmax(log_probs, axis=-1) if isinstance(log_probs, mx.array) else np.argmax(log_probs, -1))
    return [int(k) for k, _ in groupby(best.tolist()) if k != blank]


def ctc_greedy_text(log_probs, tokenizer: CTCTokenizer, blank: int) -> str:
    """The official `ctc_text`: greedy ids decoded, `<|nospeech|>` removed. log_probs: [L, V] (mx or numpy)."""
    return tokenizer.decode(ctc_greedy_ids(log_probs, blank)).replace(NOSPEECH, "")


# --- forced alignment (ref: fun_asr_nano/tools/utils.py::forced_align -> torchaudio.functional.forced_align) -------
def _viterbi(emit: np.ndarray, targets: np.ndarray, repeats: int) -> np.ndarray:
    """Best CTC path over the 2L+1 states (blank, t1, blank, t2, ..., blank); returns the state per frame.

    emit: [T, S] float32 log-probs of each state's label. Follows torchaudio's CPU kernel step by step: float32
    sums, the same window of reachable states, and torchaudio 2.11's tie-breaking (skip, or advance, only when
    strictly greater than both other moves, else stay; newer torchaudio advances on x1 > x0 alone).
    """
    T, S = emit.shape
    L = len(targets)
    neg = np.float32(-np.inf)
    idx = np.arange(S)
    tok = np.concatenate([targets, targets[-1:]])  # tok[s // 2] for odd s; padded so even s never index past the end
    skip = (idx % 2 == 1) & (idx != 1)
    skip[3::2] &= targets[1:] != targets[:-1]
    back = np.full((T, S), -1, dtype=np.int8)
    prev = np.full(S, neg, dtype=np.float32)
    start = 0 if T - (L + repeats) > 0 else 1
    end = 1 if S == 1 else 2
    prev[start:end] = emit[0, start:end]
    for t in range(1, T):
        if T - t <= L + repeats:
            if start % 2 == 1 and tok[start // 2] != tok[start // 2 + 1]:
                start += 1
            start += 1
        if t <= L + repeats:
            if end % 2 == 0 and end < 2 * L and tok[end // 2 - 1] != tok[end // 2]:
                end += 1
            end += 1
        cur = np.full(S, neg, dtype=np.float32)
        lo = start
        if start == 0:
            cur[0] = prev[0] + emit[t, 0]
            back[t, 0] = 0
            lo = 1
        if lo < end:
            i = idx[lo:end]
            x0, x1 = prev[i], prev[i - 1]
            x2 = np.where(skip[i], prev[np.maximum(i - 2, 0)], neg)
            take2 = (x2 > x1) & (x2 > x0)
            take1 = (x1 > x0) & (x1 > x2)
            cur[lo:end] = np.where(take2, x2, np.where(take1, x1, x0)) + emit[t, lo:end]
            back[t, lo:end] = np.where(take2, 2, np.where(take1, 1, 0))
        prev = cur
    state = S - 1 if prev[S - 1] > prev[S - 2] else S - 2
    path = np.empty(T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        path[t] = state
        state = min(max(state - int(back[t, state]), 0), S - 1)
    return path


def forced_align(log_probs: np.ndarray, targets: list[int], blank: int) -> list[tuple[int, int, int, float]]:
    """(token id, start frame, end frame (exclusive), score) per aligned token, as the official forced_align.

    score = max over the token's frames of exp(log-prob), rounded to 3 decimals. Returns [] where the official
    code's try/except does: no targets, more targets than frames (or than frames minus repeats), a blank or
    out-of-range id among the targets.
    """
    lp = np.asarray(log_probs, dtype=np.float32)
    T, V = lp.shape
    tg = np.asarray(targets, dtype=np.int64)
    L = len(tg)
    if L == 0 or T < L or blank in targets or tg.min() < 0 or tg.max() >= V:
        return []
    repeats = int((tg[1:] == tg[:-1]).sum())
    if T < L + repeats:
        return []
    labels = np.full(2 * L + 1, blank, dtype=np.int64)
    labels[1::2] = tg
    emit = lp[:, labels]
    states = _viterbi(emit, tg, repeats)
    path = labels[states]
    probs = np.exp(emit[np.arange(T), states])
    items = []
    t = 0
    for token, group in groupby(path.tolist()):
        n = len(list(group))
        if token != blank:
            items.append((int(token), t, t + n, round(float(probs[t: t + n].max()), 3)))
        t += n
    return items


# --- timestamps -----------------------------------------------------------------------------------------------------
@dataclass
class CTCResult:
    """What the official inference adds with a CTC branch: `ctc_text`, `timestamps` (of the LLM text),
    `ctc_timestamps` (of ctc_text)."""

    ctc_text: str
    timestamps: list[TokenTimestamp] = field(default_factory=list)
    ctc_timestamps: list[TokenTimestamp] = field(default_factory=list)


def _seconds(frame: int, offset_ms: int) -> float:
    return (frame * FRAME_MS + offset_ms) / 1000


def align_text(log_probs, text: str, tokenizer: CTCTokenizer, blank: int, *,
               offset_s: float = 0.0) -> list[TokenTimestamp]:
    """Timestamps of `text` on precomputed CTC log-probs [L, V] (mx or numpy)."""
    targets = tokenizer.encode(text)
    if not targets:
        return []
    if isinstance(log_probs, mx.array):  # copy out only the columns the alignment reads: the text's ids, the blank
        cols = sorted(set(targets) | {blank})
        if cols[-1] >= log_probs.shape[-1]:
            return []
        col_of = {c: i for i, c in enumerate(cols)}
        sub = np.asarray(log_probs[:, mx.array(cols)], dtype=np.float32)
        items = [(cols[k], s, e, score)
                 for k, s, e, score in forced_align(sub, [col_of[t] for t in targets], col_of[blank])]
    else:
        items = forced_align(np.asarray(log_probs, dtype=np.float32), targets, blank)
    offset_ms = int(round(offset_s * 1000))
    return [TokenTimestamp(token=tokenizer.decode([k]), start=_seconds(s, offset_ms), end=_seconds(e, offset_ms),
                           score=sc)
            for k, s, e, sc in items]


def blank_id(net) -> int:
    """blank = vocab - 1 (ref: model.py `ctc_conf.get("blank_id", ctc_vocab_size - 1)`)."""
    _check(net)
    return int(net.ctc_lo.weight.shape[0]) - 1


def timestamps(net, enc_out: mx.array, text: str, tokenizer: CTCTokenizer, *,
               offset_s: float = 0.0) -> list[TokenTimestamp]:
    """Per-token timestamps of `text` (the official `timestamps` when text is the LLM result text)."""
    return align_text(ctc_log_probs(net, enc_out), text, tokenizer, blank_id(net), offset_s=offset_s)


def ctc_result(net, enc_out: mx.array, text: str, tokenizer: CTCTokenizer, *, offset_s: float = 0.0,
               decoder: Decoder | None = None) -> CTCResult:
    """ctc_text, timestamps(text) and ctc_timestamps of one segment, from a single CTC pass.

    enc_out: the segment's encoder output [L, De] (no padding); text: the cleaned LLM text of that segment
    (the official `result["text"]`); offset_s: the segment's start in the audio; decoder: as in ctc_log_probs.
    """
    blank = blank_id(net)
    lp = ctc_log_probs(net, enc_out, decoder=decoder)
    mx.eval(lp)
    ctc_text = ctc_greedy_text(lp, tokenizer, blank)
    return CTCResult(
        ctc_text=ctc_text,
        timestamps=align_text(lp, text, tokenizer, blank, offset_s=offset_s),
        ctc_timestamps=align_text(lp, ctc_text, tokenizer, blank, offset_s=offset_s),
    )


__all__ = ["CTCTokenizer", "CTCResult", "TokenTimestamp", "ctc_log_probs", "ctc_greedy_text", "forced_align",
           "align_text", "timestamps", "ctc_result", "blank_id", "special_tokens"]
