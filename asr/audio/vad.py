"""Voice activity detection: Silero VAD v6 (16 kHz) on MLX, plus speech spans and segment planning.

Audio (16 kHz mono float32) is cut into windows of 512 samples; each window is prefixed with the
64 samples before it (zeros for the first window) and scored by the network:

    window + context (B, 576) -> reflect-pad right by 64 -> (B, 640)
    -> STFT as a fixed conv basis (n_fft 256, hop 128) -> magnitude (B, 4, 129)
    -> 4 x [conv1d k3 + ReLU] (strides 1, 2, 2, 1) -> (B, 1, 128)
    -> LSTM cell (128), state carried window to window -> ReLU -> 1x1 conv -> sigmoid  -> p (B,)

Everything before the LSTM depends only on the window and its context, so it runs batched over all
windows in MLX; only the LSTM recurrence is sequential (a host loop, see `LSTMCell.run`).
`VADStream` carries the LSTM state, the context and any leftover samples between calls, so
block-wise feeding equals one-shot scoring.

Level-robust detection (`robust=True`, what transcription uses): the LSTM state carries the level of what it heard,
so speech ~40 dB quieter than speech a few seconds before can score ~0 although the same clip alone scores ~0.9.
FORGETFUL more runs of the recurrence over the same encoder outputs (the encoder, the costly part, runs once) forget:
each restarts from a zero state every FORGET_EVERY windows (4 s), their restarts spread evenly (so one of them
always restarted within the last second, another has 3-4 s behind it), and a window's probability is the largest of
all. Measured on the test clips, every pair of a loud clip, 1 s of faint noise (-80 dBFS) and another clip 40 dB
down: 74 of 120 quiet clips detected by the official recurrence, 120 of 120 this way (restarts every 2 s by two
runs: also 120, but 20% of a quiet JFK after loud Chinese against 50% here and 52% for the clip alone); on noise
alone (-70 to -30 dBFS) no speech either way; the 69 s VoxPopuli clip's detected speech 59.7 s -> 61.1 s (gaps
shorter than the minimum silence now join spans: 20 -> 16 spans).

Reference: silero-vad 6.2.3 (snakers4/silero-vad), `silero_vad/data/silero_vad.jit`
(`VADRNNJIT.forward`, `STFT.transform_`, `VADDecoderRNNJIT.forward`) and `utils_vad.py` (`OnnxWrapper.__call__`,
`get_speech_timestamps_from_probs`). Weights: `asr/assets/silero_vad_16k.safetensors`, the tensors
of the official `silero_vad_16k_op15.onnx` (MIT, see `asr/assets/SILERO_VAD_LICENSE`; rebuilt by
`tools/fetch_silero_weights.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import AudioError, CheckpointError, InvalidOptionError

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "silero_vad_16k.safetensors"
FORGET_EVERY = 125  # windows (4 s): how often each forgetful recurrence of the level-robust detector restarts
FORGETFUL = 4  # how many, their restarts FORGET_EVERY / FORGETFUL windows apart


@dataclass(frozen=True)
class VADConfig:
    """Hyper-parameters of the 16 kHz Silero VAD v6 network (fixed by the checkpoint)."""

    sample_rate: int = 16000
    window: int = 512  # samples scored per step
    context: int = 64  # samples of the previous window prepended to each window
    n_fft: int = 256  # STFT basis length (conv kernel); hop is n_fft // 2
    hidden: int = 128  # encoder output / LSTM width
    block_windows: int = 2048  # windows encoded per batch (bounds memory on long audio)
    batch_align: int = 32  # encoder batches are zero-padded to a multiple of this many windows

    @property
    def hop(self) -> int:
        return self.n_fft // 2

    @property
    def reflect_pad(self) -> int:
        return self.n_fft // 4

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1


# official tensor name prefix (silero_vad_16k_op15.onnx initializers) -> module path here
_RENAMES = (
    ("model.stft.forward_basis_buffer", "stft_conv.weight"),
    ("model.encoder.0.reparam_conv.", "conv1."),
    ("model.encoder.1.reparam_conv.", "conv2."),
    ("model.encoder.2.reparam_conv.", "conv3."),
    ("model.encoder.3.reparam_conv.", "conv4."),
    ("model.decoder.rnn.", "lstm_cell."),
    ("model.decoder.decoder.2.", "final_conv."),
)


class LSTMCell(nn.Module):
    """PyTorch-layout LSTM cell (gates i, f, g, o): input projection batched in MLX, recurrence on host."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.weight_ih = mx.zeros((4 * hidden, dims))
        self.weight_hh = mx.zeros((4 * hidden, hidden))
        self.bias_ih = mx.zeros((4 * hidden,))
        self.bias_hh = mx.zeros((4 * hidden,))

    def project(self, x: mx.array) -> mx.array:
        """Input part of the gates for every step at once: (N, dims) -> (N, 4H)."""
        return x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)

    def run(self, xg: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recurrence over N steps on the host: gates (N, 4H), state (H,) x 2 -> outputs (N, H), h, c.

        Each step is a 1 x H by H x 4H product plus a few gate ops, so it is bound by dispatch cost, not
        arithmetic: a numpy loop is ~5x faster than one lazy MLX graph per step on CPU (and avoids
        thousands of tiny kernel launches on a GPU). All in float32, like the reference.
        """
        H = h.shape[-1]
        w_hh = np.array(self.weight_hh).T.copy()  # (H, 4H)
        out = np.empty((len(xg), H), np.float32)
        with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative gates: the sigmoid is then exactly 0
            for t in range(len(xg)):
                g = xg[t] + h @ w_hh
                s = 1.0 / (1.0 + np.exp(-g[: 2 * H]))  # input and forget gates
                c = s[H:] * c + s[:H] * np.tanh(g[2 * H : 3 * H])
                h = np.tanh(c) / (1.0 + np.exp(-g[3 * H :]))  # output gate * tanh(c)
                out[t] = h
        return out, h, c


class SileroVAD(nn.Module):
    """Silero VAD v6 (16 kHz). Holds weights only; run state lives in `VADStream`."""

    def __init__(self, config: VADConfig | None = None):
        super().__init__()
        cfg = self.config = config or VADConfig()
        if cfg.n_fft % 4 or (cfg.context + cfg.window + cfg.reflect_pad) % cfg.hop:
            raise InvalidOptionError(f"unsupported VAD framing: {cfg}")
        H = cfg.hidden
        # conv weights are (O, K, I) as MLX expects; `sanitize` maps the official names and layouts
        self.stft_conv = nn.Conv1d(1, 2 * cfg.bins, cfg.n_fft, stride=cfg.hop, bias=False)
        self.conv1 = nn.Conv1d(cfg.bins, H, 3, padding=1)
        self.conv2 = nn.Conv1d(H, H // 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(H // 2, H // 2, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(H // 2, H, 3, padding=1)
        self.lstm_cell = LSTMCell(H, H)
        self.final_conv = nn.Conv1d(H, 1, 1)

    # --- loading ---------------------------------------------------------------------------------
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official (PyTorch) names and layouts -> this module's. Conv weights (O, I, K) -> (O, K, I)."""
        out = {}
        for key, value in weights.items():
            for prefix, ours in _RENAMES:
                if key.startswith(prefix):
                    key = ours + key[len(prefix) :]
                    break
            out[key] = value.transpose(0, 2, 1) if value.ndim == 3 else value
        return out

    @classmethod
    def load(cls, path: str | Path | None = None) -> SileroVAD:
        """Load the 16 kHz Silero VAD from a safetensors file (default: the bundled asset)."""
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"VAD weights not found: {path} (run `python -m tools.fetch_silero_weights`)")
        try:
            weights = mx.load(str(path))
        except Exception as exc:  # corrupt / not safetensors
            raise CheckpointError(f"cannot read VAD weights {path}: {exc}") from exc
        model = cls()
        try:
            model.load_weights(list(cls.sanitize(weights).items()), strict=True)
        except ValueError as exc:
            raise CheckpointError(f"VAD weights {path} do not match Silero VAD v6 16 kHz: {exc}") from exc
        model.eval()
        mx.eval(model.parameters())
        return model

    # --- network -------------------------------------------------------------------------------
    def encode(self, x: mx.array) -> mx.array:
        """Windows with context (B, context + window) -> LSTM input gates (B, 4H)."""
        cfg = self.config
        B = x.shape[0]
        # reflection pad on the right (edge sample not repeated), as torch ReflectionPad1d((0, p))
        p = cfg.reflect_pad
        x = mx.concatenate([x, x[:, -p - 1 : -1][:, ::-1]], axis=1)
        # STFT frames with hop = n_fft / 2: frame t = chunks t and t+1 of length hop
        chunks = x.reshape(B, -1, cfg.hop)
        frames = mx.concatenate([chunks[:, :-1], chunks[:, 1:]], axis=-1)  # (B, T, n_fft)
        spec = frames @ self.stft_conv.weight[..., 0].T  # (B, T, 2 * bins): real | imag
        re, im = spec[..., : cfg.bins], spec[..., cfg.bins :]
        y = mx.sqrt(re * re + im * im)  # (B, T=4, bins)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            y = nn.relu(conv(y))
        return self.lstm_cell.project(y.reshape(B, -1))  # (B, 1, H) -> (B, 4H)

    def decode(self, h: mx.array) -> mx.array:
        """LSTM outputs (N, H) -> speech probabilities (N,)."""
        w = self.final_conv.weight[:, 0, :]  # (1, H)
        return mx.sigmoid(nn.relu(h) @ w.T + self.final_conv.bias)[:, 0]

    # --- public API ----------------------------------------------------------------------------
    def stream(self, robust: bool = False) -> VADStream:
        """A fresh stateful scorer (zero LSTM state, zero context); robust: level-robust (module docstring)."""
        return VADStream(self, robust)

    def probabilities(self, samples: np.ndarray, robust: bool = False) -> np.ndarray:
        """Speech probability per 512-sample window of 16 kHz mono float audio (last window zero-padded);
        robust=False is the official detector's, robust=True the level-robust one (module docstring)."""
        s = self.stream(robust)
        return np.concatenate([s.feed(samples), s.flush()])


class VADStream:
    """Block-wise scoring of long audio; `feed` in any block sizes then `flush` == one-shot.

    Reproduces the official streaming use (`OnnxWrapper.__call__`): each 512-sample window is scored
    with the last 64 samples of the previous window as context and the LSTM state carried over.
    """

    def __init__(self, model: SileroVAD, robust: bool = False):
        self.model = model
        self.robust = robust
        cfg = model.config
        self.h = np.zeros(cfg.hidden, np.float32)
        self.c = np.zeros(cfg.hidden, np.float32)
        # the forgetful recurrences (robust only): (h, c) of each, restarted at their own window indices
        self.short = [(np.zeros(cfg.hidden, np.float32), np.zeros(cfg.hidden, np.float32)) for _ in range(FORGETFUL)]
        self.context = np.zeros(cfg.context, np.float32)
        self.pending = np.zeros(0, np.float32)
        self.windows_done = 0  # windows scored so far: window k starts at k * 512 samples

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Score every complete window now available; leftover samples wait for the next call."""
        x = np.concatenate([self.pending, _as_mono_float(samples)])
        n = len(x) // self.model.config.window
        self.pending = x[n * self.model.config.window :]
        return self._score(x[: n * self.model.config.window])

    def flush(self) -> np.ndarray:
        """Score the leftover partial window, zero-padded to 512 samples (no-op if none)."""
        if not len(self.pending):
            return np.zeros(0, np.float32)
        x = np.zeros(self.model.config.window, np.float32)
        x[: len(self.pending)] = self.pending
        self.pending = np.zeros(0, np.float32)
        return self._score(x)

    def _score(self, x: np.ndarray) -> np.ndarray:
        cfg = self.model.config
        n = len(x) // cfg.window
        if n == 0:
            return np.zeros(0, np.float32)
        padded = np.concatenate([self.context, x])
        self.context = x[-cfg.context :].copy()
        out = []
        for b in range(0, n, cfg.block_windows):
            m = min(cfg.block_windows, n - b)
            # window k of this block starts at padded[(b + k) * window] and spans context + window samples
            start = b * cfg.window
            seg = padded[start : start + m * cfg.window + cfg.context]
            view = np.lib.stride_tricks.sliding_window_view(seg, cfg.context + cfg.window)[:: cfg.window]
            # batches are padded to a multiple of `batch_align` rows, so every row takes the same matmul
            # kernels whatever the block size (a 1-row batch would take a gemv path that differs in the
            # last bit): block-wise streaming is then bit-identical to one-shot scoring
            rows = -(-m // cfg.batch_align) * cfg.batch_align
            batch = np.zeros((rows, view.shape[1]), np.float32)
            batch[:m] = view
            gates = np.array(self.model.encode(mx.array(batch)))[:m]
            hs = np.zeros((rows, cfg.hidden), np.float32)
            hs[:m], self.h, self.c = self.model.lstm_cell.run(gates, self.h, self.c)
            p = np.array(self.model.decode(mx.array(hs)))[:m]
            if self.robust:
                first = self.windows_done + b  # the global index of this block's first window
                for i in range(FORGETFUL):
                    hs[:m], self.short[i] = self._forgetful(gates, first, i * FORGET_EVERY // FORGETFUL, *self.short[i])
                    p = np.maximum(p, np.array(self.model.decode(mx.array(hs)))[:m])
            out.append(p)
        self.windows_done += n
        return np.concatenate(out).astype(np.float32, copy=False)


    def _forgetful(self, gates: np.ndarray, first: int, offset: int, h: np.ndarray,
                   c: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """The recurrence over `gates` (windows first, first + 1, ...) from state (h, c), restarted from zeros at
        every window index k with (k - offset) % FORGET_EVERY == 0."""
        period = FORGET_EVERY
        out, start = [], 0
        while start < len(gates):
            k = first + start
            if (k - offset) % period == 0:
                h, c = np.zeros_like(h), np.zeros_like(c)
            stop = min(len(gates), start + period - (k - offset) % period)
            o, h, c = self.model.lstm_cell.run(gates[start:stop], h, c)
            out.append(o)
            start = stop
        return np.concatenate(out), (h, c)


def _as_mono_float(samples: np.ndarray) -> np.ndarray:
    a = np.asarray(samples)
    if a.ndim != 1:
        raise AudioError(f"VAD expects 1-D mono samples, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioError(f"VAD expects float samples in [-1, 1], got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


# --- speech spans ---------------------------------------------------------------------------------
@dataclass
class SpeechSpan:
    """A stretch of audio in seconds."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def speech_spans(
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_speech_s: float = 0.25,
    min_silence_s: float = 0.1,
    speech_pad_s: float = 0.03,
    window: int = 512,
    sample_rate: int = 16000,
    num_samples: int | None = None,
) -> list[SpeechSpan]:
    """Speech spans from per-window probabilities, with hysteresis.

    Speech starts at the first window with p >= threshold and ends where p first fell below
    neg_threshold (default threshold - 0.15) once that quiet stretch has lasted min_silence_s; spans no
    longer than min_speech_s are dropped; spans are then padded by speech_pad_s (halving gaps that are
    too short for two pads). `num_samples` is the audio length (default len(probs) * window).
    Reference: silero-vad `utils_vad.get_speech_timestamps_from_probs` (without max_speech_duration_s;
    long spans are split by `plan_segments`).
    """
    if not 0.0 < threshold < 1.0:
        raise InvalidOptionError(f"threshold must be in (0, 1), got {threshold}")
    neg = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
    if not 0.0 <= neg <= threshold:
        raise InvalidOptionError(f"neg_threshold must be in [0, threshold], got {neg}")
    total = len(probs) * window if num_samples is None else int(num_samples)
    min_speech = min_speech_s * sample_rate
    min_silence = min_silence_s * sample_rate
    pad = speech_pad_s * sample_rate

    spans: list[list[float]] = []  # [start, end] in samples
    start: int | None = None  # start of the current speech run
    quiet_from: int | None = None  # first sample of the current below-neg stretch inside speech
    for i, p in enumerate(np.asarray(probs, dtype=np.float64)):
        pos = i * window
        if p >= threshold:
            quiet_from = None
            if start is None:
                start = pos
        elif start is not None and p < neg:
            if quiet_from is None:
                quiet_from = pos
            if pos - quiet_from >= min_silence:
                if quiet_from - start > min_speech:
                    spans.append([start, quiet_from])
                start = quiet_from = None
    if start is not None and total - start > min_speech:
        spans.append([start, total])

    # pad: full pad where the gap allows two pads, otherwise split the gap in half
    for k, span in enumerate(spans):
        if k == 0:
            span[0] = max(0.0, span[0] - pad)
        if k + 1 < len(spans):
            gap = spans[k + 1][0] - span[1]
            grow = gap // 2 if gap < 2 * pad else pad
            span[1] += grow
            spans[k + 1][0] = max(0.0, spans[k + 1][0] - grow)
        else:
            span[1] = min(total, span[1] + pad)
    return [SpeechSpan(s / sample_rate, e / sample_rate) for s, e in spans]


def plan_segments(
    spans: list[SpeechSpan],
    probs: np.ndarray,
    *,
    max_segment_s: float = 30.0,
    merge_gap_s: float = 1.0,
    min_piece_s: float = 1.0,
    pad_s: float = 0.2,
    duration_s: float | None = None,
    window: int = 512,
    sample_rate: int = 16000,
) -> list[SpeechSpan]:
    """Turn speech spans into recognition segments no longer than max_segment_s.

    1. A span longer than max_segment_s is cut at the centre of its quietest window (lowest
       probability) among those that leave pieces of at least min_piece_s and a first piece that fits;
       repeated on the rest.
    2. Neighbours closer than merge_gap_s (cut pieces touch) are merged while the result stays
       <= max_segment_s, so an early quiet cut does not leave a needlessly short segment.
    3. Each segment grows by up to pad_s per side, never past half the gap to a neighbour, the audio
       bounds [0, duration_s] (default len(probs) * window / sample_rate) or max_segment_s.
    """
    if max_segment_s <= 2 * min_piece_s or min_piece_s <= 0:
        raise InvalidOptionError(f"need max_segment_s > 2 * min_piece_s > 0, got {max_segment_s}, {min_piece_s}")
    if merge_gap_s < 0 or pad_s < 0:
        raise InvalidOptionError("merge_gap_s and pad_s must be >= 0")
    probs = np.asarray(probs, dtype=np.float64)
    hop = window / sample_rate
    duration = len(probs) * hop if duration_s is None else float(duration_s)
    centers = (np.arange(len(probs)) + 0.5) * hop

    pieces: list[SpeechSpan] = []
    for span in sorted(spans, key=lambda s: s.start):
        start, end = max(0.0, span.start), min(duration, span.end)
        while end - start > max_segment_s:
            lo, hi = start + min_piece_s, min(start + max_segment_s, end - min_piece_s)
            idx = np.flatnonzero((centers >= lo) & (centers <= hi))
            cut = hi if len(idx) == 0 else float(centers[idx[np.argmin(probs[idx])]])
            pieces.append(SpeechSpan(start, cut))
            start = cut
        if end > start:
            pieces.append(SpeechSpan(start, end))

    merged: list[SpeechSpan] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and piece.start - last.end <= merge_gap_s and piece.end - last.start <= max_segment_s:
            last.end = max(last.end, piece.end)
        else:
            merged.append(SpeechSpan(piece.start, piece.end))

    out: list[SpeechSpan] = []
    for k, seg in enumerate(merged):
        room_l = seg.start - (merged[k - 1].end + seg.start) / 2 if k else seg.start
        room_r = ((merged[k + 1].start + seg.end) / 2 if k + 1 < len(merged) else duration) - seg.end
        left, right = min(pad_s, max(room_l, 0.0)), min(pad_s, max(room_r, 0.0))
        excess = seg.duration + left + right - max_segment_s
        if excess > 0:  # keep the limit: share the excess between the two pads, as far as each allows
            cut_l = min(left, max(excess / 2, excess - right))
            left, right = left - cut_l, max(0.0, right - (excess - cut_l))
        out.append(SpeechSpan(max(0.0, seg.start - left), min(duration, seg.end + right)))
    return out
