"""Kaldi fbank + LFR features, as the official WavFrontend computes them.

Reference: funasr/frontends/wav_frontend.py::WavFrontend.forward (kaldi.fbank with dither 0 at inference,
upsacle_samples x32768) and ::apply_lfr; torchaudio/compliance/kaldi.py::fbank for the fbank recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    lfr_m: int = 7
    lfr_n: int = 6
    preemphasis: float = 0.97
    low_freq: float = 20.0
    window: str = "hamming"
    upscale: float = 32768.0  # upsacle_samples=True

    @classmethod
    def from_dict(cls, conf: dict) -> FrontendConfig:
        if conf.get("window", "hamming") != "hamming":
            raise ValueError(f"unsupported frontend window {conf.get('window')!r} (only hamming)")
        if conf.get("cmvn_file"):
            raise ValueError("a CMVN file is not supported for Fun-ASR-Nano (the official checkpoint has none)")
        return cls(
            sample_rate=int(conf.get("fs", 16000)),
            n_mels=int(conf.get("n_mels", 80)),
            frame_length_ms=float(conf.get("frame_length", 25)),
            frame_shift_ms=float(conf.get("frame_shift", 10)),
            lfr_m=int(conf.get("lfr_m", 7)),
            lfr_n=int(conf.get("lfr_n", 6)),
        )

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def padded_window_size(self) -> int:
        return 1 << math.ceil(math.log2(self.window_size))

    @property
    def feature_dim(self) -> int:
        return self.n_mels * self.lfr_m


def _mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


@lru_cache(maxsize=4)
def mel_banks(cfg: FrontendConfig) -> mx.array:
    """Kaldi triangular mel filters, [n_fft/2 + 1, n_mels] (Nyquist row zero). Ref: kaldi.get_mel_banks."""
    n_fft = cfg.padded_window_size
    num_bins = n_fft // 2
    bin_width = cfg.sample_rate / n_fft
    mel_low, mel_high = _mel(np.float64(cfg.low_freq)), _mel(np.float64(cfg.sample_rate / 2))
    delta = (mel_high - mel_low) / (cfg.n_mels + 1)
    b = np.arange(cfg.n_mels, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(bin_width * np.arange(num_bins, dtype=np.float64))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = np.maximum(0.0, np.minimum(up, down))  # zero outside (left, right)
    banks = np.zeros((num_bins + 1, cfg.n_mels), dtype=np.float32)
    banks[:num_bins] = w.T.astype(np.float32)
    return mx.array(banks)


@lru_cache(maxsize=4)
def _window(cfg: FrontendConfig) -> mx.array:
    """Kaldi's hamming window (the ASR frontend's) or povey window, (0.5 - 0.5 cos(2 pi i / (n-1)))^0.85 (CAM++'s).
    Ref: torchaudio kaldi._feature_window_function."""
    n = cfg.window_size
    i = np.arange(n, dtype=np.float64)
    if cfg.window == "povey":
        w = np.power(0.5 - 0.5 * np.cos(2 * np.pi * i / (n - 1)), 0.85)
    elif cfg.window == "hamming":
        w = 0.54 - 0.46 * np.cos(2 * np.pi * i / (n - 1))
    else:
        raise ValueError(f"unsupported fbank window {cfg.window!r} (hamming or povey)")
    return mx.array(w.astype(np.float32))


def num_frames(num_samples: int, cfg: FrontendConfig = FrontendConfig()) -> int:
    """snip_edges=True framing: 1 + (N - window) // shift (0 when N < window)."""
    if num_samples < cfg.window_size:
        return 0
    return 1 + (num_samples - cfg.window_size) // cfg.window_shift


def fbank(samples: mx.array, cfg: FrontendConfig = FrontendConfig()) -> mx.array:
    """Log mel filterbank [T, n_mels] of float samples in [-1, 1] (16 kHz mono); [B, N] samples give [B, T, n_mels]."""
    x = samples.astype(mx.float32) * cfg.upscale
    t = num_frames(x.shape[-1], cfg)
    if t == 0:
        raise ValueError(f"audio of {x.shape[-1]} samples is shorter than one {cfg.frame_length_ms} ms frame")
    idx = mx.arange(t)[:, None] * cfg.window_shift + mx.arange(cfg.window_size)[None, :]
    frames = mx.take(x, idx, axis=-1)                                  # [..., T, 400]
    frames = frames - mx.mean(frames, axis=-1, keepdims=True)          # remove DC offset
    prev = mx.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)  # pre-emphasis, y[0] = x[0] - a*x[0]
    frames = frames - cfg.preemphasis * prev
    frames = frames * _window(cfg)
    pad = cfg.padded_window_size - cfg.window_size
    frames = mx.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(0, pad)])
    spec = mx.fft.rfft(frames, axis=-1)
    power = mx.square(mx.real(spec)) + mx.square(mx.imag(spec))       # [..., T, 257]
    mel = power @ mel_banks(cfg)
    return mx.log(mx.maximum(mel, np.finfo(np.float32).eps))


def lfr(feats: mx.array, m: int = 7, n: int = 6) -> mx.array:
    """Low frame rate stacking: row i = frames 6i-3 .. 6i+3 (edge-clamped), [ceil(T/n), m*D].

    Ref: funasr/frontends/wav_frontend.py::apply_lfr (left pad (m-1)//2 copies of frame 0, repeat the
    last frame as needed).
    """
    t, d = feats.shape
    rows = -(-t // n)
    return feats[mx.array(_lfr_index(t, rows, m, n))].reshape(rows, m * d)


def _lfr_index(num_frames: int, rows: int, m: int, n: int) -> np.ndarray:
    """[rows, m] int32: the frames LFR row i stacks, n*i - (m-1)//2 .. + m-1, clamped to 0..num_frames-1."""
    idx = np.arange(rows)[:, None] * n + np.arange(m)[None, :] - (m - 1) // 2
    return np.clip(idx, 0, num_frames - 1).astype(np.int32)


def features(samples: mx.array, cfg: FrontendConfig = FrontendConfig()) -> mx.array:
    """Encoder input features [L, 560] for one utterance."""
    return lfr(fbank(samples, cfg), cfg.lfr_m, cfg.lfr_n)


def features_padded(samples: list[np.ndarray], cfg: FrontendConfig = FrontendConfig()) -> tuple[mx.array, list[int]]:
    """`features` of several utterances in one pass: [B, L, feature_dim] with zero rows past each utterance's own
    length, and those lengths (L = the longest).

    The waveforms are zero-padded to a common length on the device (each copied there as it is: no padded copy
    on the host, which cost more than the whole fbank for 64 segments on a GPU): every fbank frame depends only on
    its own 400 samples, so the first T_i frames of row i equal `fbank` of utterance i alone. LFR then
    gathers every utterance's rows at once, each clamped at its own last frame as `lfr` does: row for row the
    same values as `features` of each utterance, with a fixed number of kernels whatever the batch size.
    """
    counts = [int(s.shape[0]) for s in samples]
    frames = [num_frames(n, cfg) for n in counts]
    if any(t == 0 for t in frames):
        raise ValueError(f"an utterance is shorter than one {cfg.frame_length_ms} ms frame")
    width = max(counts)
    waves = [mx.array(np.asarray(s, dtype=np.float32)) for s in samples]
    batch = mx.stack([w if n == width else mx.pad(w, (0, width - n)) for w, n in zip(waves, counts, strict=True)])
    fb = fbank(batch, cfg)  # [B, T, n_mels]
    B, T, D = fb.shape
    m, n = cfg.lfr_m, cfg.lfr_n
    lengths = [-(-t // n) for t in frames]
    L = max(lengths)
    idx = np.stack([_lfr_index(t, L, m, n) for t in frames]) + (np.arange(B, dtype=np.int32) * T)[:, None, None]
    rows = mx.take(fb.reshape(B * T, D), mx.array(idx.reshape(-1)), axis=0).reshape(B, L, m * D)
    valid = np.arange(L)[None, :] < np.array(lengths)[:, None]
    return rows * mx.array(valid[:, :, None].astype(np.float32)), lengths


def audio_token_count(num_lfr_frames: int) -> int:
    """How many adaptor rows reach the LLM: ceil(L/8), via the reference's three halvings.

    Ref: funasr/models/fun_asr_nano/model.py::data_load_speech (use_low_frame_rate).
    """
    olens = 1 + (num_lfr_frames - 3 + 2 * 1) // 2
    olens = 1 + (olens - 3 + 2 * 1) // 2
    return (olens - 1) // 2 + 1
