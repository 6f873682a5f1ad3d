"""CAM++ speaker embeddings in MLX, as the official funasr code computes them.

Ref: funasr/models/campplus/model.py::CAMPPlus (the network) and components.py (FCM, BasicResBlock, TDNNLayer,
CAMDenseTDNNBlock, CAMDenseTDNNLayer, CAMLayer, TransitLayer, StatsPool, DenseLayer, get_nonlinear);
funasr/models/campplus/utils.py::extract_feature (the frontend: Kaldi fbank with 80 bins and torchaudio's defaults,
i.e. the povey window, dither 0, the waveform in [-1, 1] NOT scaled by 32768, then minus its mean over time).

    FCM head (2-D ResNet over frequency x time, 32 channels, frequency / 8)   [B, T, F]  -> [B, T, 32 * F/8]
    TDNN (k 5, stride 2) -> 3 x (CAM dense block + transit layer) -> BN-ReLU  -> [B, T/2, C]
    statistics pooling (mean, unbiased std over time) -> dense (1x1 + BN w/o affine) -> [B, embedding_size]

Layout: the official code computes [B, C, T] and [B, C, F, T]; here [B, T, C] and [B, F, T, C] (MLX convolutions
are channels-last). Parameter names are the official state-dict keys; convolution weights are stored in MLX's
[O, (kh,) k, I] order. BatchNorm runs in eval mode (running statistics), as the official inference does.
Pure MLX: no device checks; NumPy only for host-side constants (the window, segment counts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..audio.features import FrontendConfig, num_frames
from ..audio.features import fbank as asr_fbank
from ..errors import EmptyAudioError

BN_EPS = 1e-5  # torch.nn.BatchNorm1d/2d default eps
SEG_LEN = 100  # CAMLayer.seg_pooling(seg_len=100) of the official code: context of 1 s at the TDNN's 50 frames/s
FCM_CHANNELS = 32  # FCM(m_channels=32), fixed by CAMPPlus
FCM_BLOCKS = 2  # FCM(num_blocks=[2, 2]); both layers use num_blocks[0]
DENSE_BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))  # (layers, kernel, dilation), fixed in CAMPPlus.__init__
_NONLINEAR_OPS = ("batchnorm", "batchnorm_", "relu", "prelu")

# The stages the parity test compares, in order; each takes the previous one's output (the first, the features).
STAGES = (
    "head.layer1", "head.layer2", "head",
    "xvector.tdnn", "xvector.block1", "xvector.transit1", "xvector.block2", "xvector.transit2",
    "xvector.block3", "xvector.transit3", "xvector.out_nonlinear", "xvector.stats", "xvector.dense",
)


@dataclass(frozen=True)
class CAMPPlusConfig:
    """The CAMPPlus constructor arguments that shape the network (config.yaml `model_conf`).

    The defaults are the official class's, which are also the released zh-cn checkpoint's values."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    config_str: str = "batchnorm-relu"
    output_level: str = "segment"
    sample_rate: int = 16000

    def __post_init__(self):
        for name in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels"):
            v = getattr(self, name)
            if type(v) is not int or not 0 < v <= 1 << 16:
                raise ValueError(f"CAM++ {name} must be a positive int (at most 65536), got {v!r}")
        if self.feat_dim % 8:
            raise ValueError(f"CAM++ feat_dim must be a multiple of 8 (the FCM head halves it 3 times), "
                             f"got {self.feat_dim}")
        if self.bn_size * self.growth_rate < 2:
            raise ValueError("CAM++ bn_size * growth_rate must be at least 2 (the CAM layer halves it)")
        ops = str(self.config_str).split("-")
        if not ops or any(op not in _NONLINEAR_OPS for op in ops):
            raise ValueError(f"CAM++ config_str {self.config_str!r}: each '-'-separated part must be one of "
                             f"{_NONLINEAR_OPS}")
        if self.output_level != "segment":
            raise ValueError(f"CAM++ output_level {self.output_level!r} is not supported (only 'segment': one "
                             "embedding per utterance)")
        if self.sample_rate != 16000:
            raise ValueError(f"CAM++ runs at 16 kHz (the official frontend's rate), got {self.sample_rate}")

    @classmethod
    def from_official(cls, model_conf: dict | None) -> CAMPPlusConfig:
        """From config.yaml's `model_conf` (unknown keys such as memory_efficient, a training switch, ignored)."""
        conf = dict(model_conf or {})
        known = {k: conf[k] for k in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels",
                                      "config_str", "output_level") if k in conf}
        return cls(**known)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CAMPPlusConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def head_channels(self) -> int:
        return FCM_CHANNELS * (self.feat_dim // 8)


# --- the frontend --------------------------------------------------------------------------------------------
def _frontend_config(num_mel_bins: int, sample_rate: int) -> FrontendConfig:
    # the fbank's framing and mel banks are the ASR frontend's (asr.audio.features); only the window (povey, not
    # hamming) and the scale (none, not x32768) differ, and LFR is not applied
    return FrontendConfig(sample_rate=sample_rate, n_mels=num_mel_bins, window="povey", upscale=1.0, lfr_m=1,
                          lfr_n=1)


def fbank(samples: mx.array, num_mel_bins: int = 80, sample_rate: int = 16000) -> mx.array:
    """Kaldi log-mel fbank [T, num_mel_bins] with torchaudio's `kaldi.fbank` defaults (what CAM++ uses): the ASR
    frontend's fbank (asr.audio.features.fbank: 25/10 ms frames, DC offset removed, pre-emphasis 0.97, 512-point
    power spectrum, mel banks from 20 Hz, log floored at FLT_EPSILON) with the povey window and the samples as given
    (float in [-1, 1], not scaled)."""
    cfg = _frontend_config(num_mel_bins, sample_rate)
    if num_frames(samples.shape[-1], cfg) == 0:
        raise EmptyAudioError(f"audio of {samples.shape[-1]} samples is shorter than one {cfg.frame_length_ms:g} ms "
                              f"frame ({cfg.window_size} samples); a speaker embedding needs more audio")
    return asr_fbank(samples, cfg)


def features(samples_16k: np.ndarray, num_mel_bins: int = 80) -> mx.array:
    """CAM++ input [T, num_mel_bins] of one utterance (16 kHz mono float samples in [-1, 1]): the fbank minus its
    mean over time; [B, N] (utterances of one length) gives [B, T, num_mel_bins] in one pass.
    Ref: funasr/models/campplus/utils.py::extract_feature."""
    x = samples_16k if isinstance(samples_16k, mx.array) else mx.array(np.asarray(samples_16k, dtype=np.float32))
    if x.ndim not in (1, 2):
        raise ValueError(f"features() takes one mono utterance [N] or a batch [B, N], got shape {tuple(x.shape)}")
    fb = fbank(x, num_mel_bins)
    return fb - mx.mean(fb, axis=-2, keepdims=True)


# --- building blocks -----------------------------------------------------------------------------------------
def _relu(x: mx.array) -> mx.array:
    return mx.maximum(x, 0)


class BatchNorm(nn.Module):
    """BatchNorm1d/2d in eval mode over the last (channel) axis; affine=False: no weight and bias."""

    def __init__(self, channels: int, affine: bool = True):
        super().__init__()
        if affine:
            self.weight = mx.ones((channels,))
            self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.eps = BN_EPS

    def __call__(self, x: mx.array) -> mx.array:
        y = (x - self.running_mean) * mx.rsqrt(self.running_var + self.eps)
        if "weight" in self:
            y = y * self.weight + self.bias
        return y


class PReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = mx.full((channels,), 0.25)

    def __call__(self, x: mx.array) -> mx.array:
        return mx.where(x >= 0, x, self.weight * x)


class Nonlinear(nn.Module):
    """get_nonlinear(config_str, channels): the '-'-separated ops in order (batchnorm, batchnorm_, relu, prelu)."""

    def __init__(self, config_str: str, channels: int):
        super().__init__()
        self.config_str = config_str
        for op in config_str.split("-"):
            if op in ("batchnorm", "batchnorm_"):
                self.batchnorm = BatchNorm(channels, affine=op == "batchnorm")
            elif op == "prelu":
                self.prelu = PReLU(channels)
            elif op != "relu":
                raise ValueError(f"unexpected nonlinearity {op!r} in {config_str!r}")

    def __call__(self, x: mx.array) -> mx.array:
        for op in self.config_str.split("-"):
            if op == "relu":
                x = _relu(x)
            elif op == "prelu":
                x = self.prelu(x)
            else:
                x = self.batchnorm(x)
        return x


class Conv1d(nn.Module):
    """torch Conv1d on [B, T, C]; weight [O, k, I]. A 1x1 convolution is a matrix product (also on [B, C])."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, dilation: int = 1,
                 bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, cin))
        if bias:
            self.bias = mx.zeros((cout,))
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        o, k, i = w.shape
        if k == 1 and self.stride == 1 and self.padding == 0:
            y = x @ w.reshape(o, i).T
        elif self.stride == 1 and x.ndim == 3:
            # the k taps side by side, then one product: the same sums as mx.conv1d, which on MLX's CPU device takes
            # ~38x longer with dilation 2 (blocks 2 and 3; docs/diarization.md "Speed")
            t, d = x.shape[1], self.dilation
            t_out = t + 2 * self.padding - d * (k - 1)
            xp = mx.pad(x, [(0, 0), (self.padding, self.padding), (0, 0)]) if self.padding else x
            taps = mx.concatenate([xp[:, j * d: j * d + t_out] for j in range(k)], axis=-1)
            y = taps @ w.reshape(o, k * i).T
        else:
            y = mx.conv1d(x, w, stride=self.stride, padding=self.padding, dilation=self.dilation)
        if "bias" in self:
            y = y + self.bias
        return y


class Conv2d(nn.Module):
    """torch Conv2d (no bias) on [B, F, T, C]; weight [O, kh, kw, I]; stride on frequency only."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride_f: int = 1, padding: int = 0):
        super().__init__()
        self.weight = mx.zeros((cout, kernel, kernel, cin))
        self.stride_f, self.padding = stride_f, padding

    def __call__(self, x: mx.array) -> mx.array:
        return mx.conv2d(x, self.weight, stride=(self.stride_f, 1), padding=(self.padding, self.padding))


# --- FCM head ------------------------------------------------------------------------------------------------
class BasicResBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = Conv2d(cin, planes, 3, stride_f=stride, padding=1)
        self.bn1 = BatchNorm(planes)
        self.conv2 = Conv2d(planes, planes, 3, padding=1)
        self.bn2 = BatchNorm(planes)
        if stride != 1 or cin != planes:
            self.shortcut = [Conv2d(cin, planes, 1, stride_f=stride), BatchNorm(planes)]

    def __call__(self, x: mx.array) -> mx.array:
        out = _relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = self.shortcut[1](self.shortcut[0](x)) if "shortcut" in self else x
        return _relu(out + short)


class FCM(nn.Module):
    def __init__(self, feat_dim: int):
        super().__init__()
        m = FCM_CHANNELS
        self.conv1 = Conv2d(1, m, 3, padding=1)
        self.bn1 = BatchNorm(m)
        self.layer1 = [BasicResBlock(m, m, 2)] + [BasicResBlock(m, m, 1) for _ in range(FCM_BLOCKS - 1)]
        self.layer2 = [BasicResBlock(m, m, 2)] + [BasicResBlock(m, m, 1) for _ in range(FCM_BLOCKS - 1)]
        self.conv2 = Conv2d(m, m, 3, stride_f=2, padding=1)
        self.bn2 = BatchNorm(m)

    def stem_layer1(self, feats: mx.array) -> mx.array:
        """[B, T, F] -> [B, F/2, T, 32]"""
        x = feats.transpose(0, 2, 1)[..., None]
        x = _relu(self.bn1(self.conv1(x)))
        for blk in self.layer1:
            x = blk(x)
        return x

    def run_layer2(self, x: mx.array) -> mx.array:
        for blk in self.layer2:
            x = blk(x)
        return x

    def out(self, x: mx.array) -> mx.array:
        """[B, F/4, T, 32] -> [B, T, 32 * F/8] (channel-major rows, as torch's reshape of [B, C, F, T])."""
        x = _relu(self.bn2(self.conv2(x)))
        b, f, t, c = x.shape
        return x.transpose(0, 2, 3, 1).reshape(b, t, c * f)

    def __call__(self, feats: mx.array) -> mx.array:
        return self.out(self.run_layer2(self.stem_layer1(feats)))


# --- the x-vector trunk --------------------------------------------------------------------------------------
def _same_padding(kernel: int, dilation: int) -> int:
    if kernel % 2 != 1:
        raise ValueError(f"expected an odd kernel size, got {kernel}")
    return (kernel - 1) // 2 * dilation


class TDNNLayer(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, dilation: int, config_str: str):
        super().__init__()
        self.linear = Conv1d(cin, cout, kernel, stride=stride, padding=_same_padding(kernel, dilation),
                             dilation=dilation)
        self.nonlinear = Nonlinear(config_str, cout)

    def __call__(self, x: mx.array) -> mx.array:
        return self.nonlinear(self.linear(x))


def seg_means(x: mx.array, seg_len: int = SEG_LEN) -> mx.array:
    """Mean of each `seg_len`-frame segment (the last one partial: the mean of the frames it has, like torch's
    avg_pool1d with ceil_mode): [B, T, C] -> [B, ceil(T / seg_len), C]. (The official seg_pooling then repeats each
    mean over its frames; CAMLayer repeats the mask instead, which is the same per frame.)"""
    b, t, c = x.shape
    n = -(-t // seg_len)
    pad = n * seg_len - t
    xp = mx.pad(x, [(0, 0), (0, pad), (0, 0)]) if pad else x
    sums = xp.reshape(b, n, seg_len, c).sum(axis=2)
    counts = np.full(n, seg_len, dtype=np.float32)
    counts[-1] = t - seg_len * (n - 1)
    return sums / mx.array(counts)[None, :, None]


class CAMLayer(nn.Module):
    """Context-aware masking: a local TDNN output gated by a sigmoid of the utterance + segment context."""

    def __init__(self, bn_channels: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.linear_local = Conv1d(bn_channels, cout, kernel, padding=_same_padding(kernel, dilation),
                                   dilation=dilation)
        self.linear1 = Conv1d(bn_channels, bn_channels // 2, 1, bias=True)
        self.linear2 = Conv1d(bn_channels // 2, cout, 1, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear_local(x)
        # the context is constant within a segment, so the mask is computed once per segment, then repeated
        context = mx.mean(x, axis=1, keepdims=True) + seg_means(x)
        m = mx.sigmoid(self.linear2(_relu(self.linear1(context))))
        return y * mx.take(m, mx.arange(x.shape[1]) // SEG_LEN, axis=1)


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, cin: int, cout: int, bn_channels: int, kernel: int, dilation: int, config_str: str):
        super().__init__()
        self.nonlinear1 = Nonlinear(config_str, cin)
        self.linear1 = Conv1d(cin, bn_channels, 1)
        self.nonlinear2 = Nonlinear(config_str, bn_channels)
        self.cam_layer = CAMLayer(bn_channels, cout, kernel, dilation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.Module):
    """Dense connectivity: each layer's `growth` new channels are appended to its input."""

    def __init__(self, num_layers: int, cin: int, growth: int, bn_channels: int, kernel: int, dilation: int,
                 config_str: str):
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"tdnnd{i + 1}",
                    CAMDenseTDNNLayer(cin + i * growth, growth, bn_channels, kernel, dilation, config_str))

    def __call__(self, x: mx.array) -> mx.array:
        for i in range(self.num_layers):
            x = mx.concatenate([x, getattr(self, f"tdnnd{i + 1}")(x)], axis=-1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, cin: int, cout: int, config_str: str):
        super().__init__()
        self.nonlinear = Nonlinear(config_str, cin)
        self.linear = Conv1d(cin, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, cout: int, config_str: str):
        super().__init__()
        self.linear = Conv1d(cin, cout, 1)
        self.nonlinear = Nonlinear(config_str, cout)

    def __call__(self, x: mx.array) -> mx.array:
        return self.nonlinear(self.linear(x))


def stats_pool(x: mx.array) -> mx.array:
    """[B, T, C] -> [B, 2C]: mean and unbiased standard deviation over time (ref: components.statistics_pooling)."""
    mean = mx.mean(x, axis=1)
    var = mx.sum(mx.square(x - mean[:, None, :]), axis=1) / (x.shape[1] - 1)
    return mx.concatenate([mean, mx.sqrt(var)], axis=-1)


class Xvector(nn.Module):
    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        cs = cfg.config_str
        self.tdnn = TDNNLayer(cfg.head_channels, cfg.init_channels, 5, stride=2, dilation=1, config_str=cs)
        ch = cfg.init_channels
        for i, (layers, kernel, dilation) in enumerate(DENSE_BLOCKS):
            setattr(self, f"block{i + 1}", CAMDenseTDNNBlock(layers, ch, cfg.growth_rate,
                                                             cfg.bn_size * cfg.growth_rate, kernel, dilation, cs))
            ch += layers * cfg.growth_rate
            setattr(self, f"transit{i + 1}", TransitLayer(ch, ch // 2, cs))
            ch //= 2
        self.out_nonlinear = Nonlinear(cs, ch)
        self.dense = DenseLayer(ch * 2, cfg.embedding_size, "batchnorm_")


def check_features(shape: tuple[int, ...], feat_dim: int) -> None:
    """What any CAM++ runner accepts: [B, T, feat_dim] with T >= 3 (ValueError / EmptyAudioError otherwise)."""
    if len(shape) != 3 or shape[-1] != feat_dim:
        raise ValueError(f"CAM++ takes features [T, {feat_dim}] or [B, T, {feat_dim}], got shape {tuple(shape)}")
    if shape[1] < 3:
        raise EmptyAudioError(f"{shape[1]} feature frames are too few for a speaker embedding (the statistics "
                              "pooling needs at least 2 frames after the stride-2 TDNN); pass at least 45 ms of audio")


class CAMPPlus(nn.Module):
    """The CAM++ network. `embed(feats)`: [T, F] -> [E] or [B, T, F] -> [B, E] (equal lengths in a batch: the
    official code does not mask padding, so utterances of different lengths are embedded one by one)."""

    def __init__(self, config: CAMPPlusConfig | None = None):
        super().__init__()
        self.config = config or CAMPPlusConfig()
        self.head = FCM(self.config.feat_dim)
        self.xvector = Xvector(self.config)

    def run_stage(self, name: str, x: mx.array) -> mx.array:
        """Apply one stage of `STAGES` to the previous stage's output (the features [B, T, F] for the first).

        Outputs: head.layer1/layer2 [B, F', T, 32]; head and xvector.tdnn .. out_nonlinear [B, T', C];
        xvector.stats [B, 2C]; xvector.dense [B, E] (the embedding)."""
        if name == "head.layer1":
            return self.head.stem_layer1(x)
        if name == "head.layer2":
            return self.head.run_layer2(x)
        if name == "head":
            return self.head.out(x)
        if name == "xvector.stats":
            return stats_pool(x)
        if name in STAGES:
            return getattr(self.xvector, name.split(".", 1)[1])(x)
        raise KeyError(f"unknown CAM++ stage {name!r}; stages: {STAGES}")

    def forward_stages(self, feats: mx.array) -> dict[str, mx.array]:
        """Every stage's output for features [T, F] or [B, T, F] (batch axis kept)."""
        x = feats[None] if feats.ndim == 2 else feats
        check_features(x.shape, self.config.feat_dim)
        out = {}
        for name in STAGES:
            x = out[name] = self.run_stage(name, x)
        return out

    def embed(self, feats: mx.array) -> mx.array:
        """Speaker embedding [E] of features [T, F], or [B, E] of [B, T, F]."""
        x = feats[None] if feats.ndim == 2 else feats
        check_features(x.shape, self.config.feat_dim)
        for name in STAGES:
            x = self.run_stage(name, x)
        return x[0] if feats.ndim == 2 else x

    __call__ = embed

    def embed_samples(self, samples: mx.array) -> mx.array:
        """[B, E] embeddings of B windows of 16 kHz samples [B, N] (one length): `features`, then `embed`."""
        return self.embed(features(samples, self.config.feat_dim))

    def embed_many(self, feats: list[mx.array]) -> mx.array:
        """[len(feats), E] for utterances of any lengths: equal lengths are batched together."""
        by_len: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            by_len.setdefault(int(f.shape[0]), []).append(i)
        rows: list[mx.array | None] = [None] * len(feats)
        for idx in by_len.values():
            emb = self.embed(mx.stack([feats[i] for i in idx]))
            for j, i in enumerate(idx):
                rows[i] = emb[j]
        return mx.stack(rows)
