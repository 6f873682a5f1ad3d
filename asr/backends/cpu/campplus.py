"""CAM++ on the CPU in NumPy + the loaded BLAS: the same network as asr.speaker.campplus (the reference, what
Metal and CUDA run), with its weights prepared once at load. Checked equal to the reference and to the official code
stage by stage (tests/test_speaker_parity.py runs both).

Why: on MLX's CPU device a 3x3 convolution of the FCM head runs at ~20 GFLOP/s and MLX's copies are slow, so the
head took ~70% of CAM++'s time. Here every convolution is a few BLAS products on row views of one padded buffer,
accumulated in place (gemm with beta = 1), and no im2col matrix is built:

- layout [B, F, T, C] (channels last), each convolution's input written into the inside of a zero-bordered buffer
  [B, F+2, T+2, C]; flattened to rows, output position r is the sum over the 3x3 taps (i, j) of row r + i(T+2) + j
  times that tap's [C, O] weights: 9 products on contiguous row ranges. A frequency stride of 2 first splits the
  buffer into its even and odd frequency rows (6 of the products then read the even half, 3 the odd);
- the x-vector's time convolutions the same way in [B, T, C] (3 taps, dilation d: offsets 0, d, 2d), its dense
  blocks grow in one preallocated [B, T, C_max] buffer instead of a concatenation per layer, and the context-aware
  mask's MLP runs once per 100-frame segment instead of once per frame (the values are the same);
- BatchNorm folded into one scale and shift per channel.

Layouts of `run_stage` are the reference's ([B, F', T, 32] for head.layer1/2, [B, T, C] after), as NumPy arrays.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...speaker.campplus import DENSE_BLOCKS, SEG_LEN, STAGES, CAMPPlus, check_features, features
from . import blas as cpu_blas

F32 = np.float32


def _np(a) -> np.ndarray:
    return np.array(a, dtype=F32)


def _fold(bn) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm (eval) as y = x * scale + shift."""
    scale = 1.0 / np.sqrt(_np(bn.running_var).astype(np.float64) + bn.eps)
    shift = -_np(bn.running_mean).astype(np.float64) * scale
    if "weight" in bn:
        w = _np(bn.weight).astype(np.float64)
        scale, shift = scale * w, shift * w + _np(bn.bias)
    return scale.astype(F32), shift.astype(F32)


def _bn_relu(x, scale, shift, out):  # x [N, C] (any strides), scale/shift [C], out [N, C]: one pass
    n, c = x.shape
    for i in range(n):
        for j in range(c):
            v = x[i, j] * scale[j] + shift[j]
            out[i, j] = v if v > 0 else 0


@functools.cache
def _bn_relu_kernel():
    """`_bn_relu` compiled by Numba (on the calling thread: parallel Numba threads would spin-wait while the BLAS's
    threads multiply right after), or None without Numba: NumPy then takes three passes."""
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(_bn_relu)
    except RuntimeError:  # no writable place for Numba's disk cache
        return numba.njit(cache=False, nogil=True, boundscheck=False)(_bn_relu)


class _Nonlinear:
    """get_nonlinear's ops in order: batchnorm (folded), relu, prelu. The official "batchnorm-relu" in one pass
    (Numba) where it can."""

    def __init__(self, mod, fuse: bool = True):
        self.ops = []
        for op in mod.config_str.split("-"):
            if op == "relu":
                self.ops.append(("relu", None))
            elif op == "prelu":
                self.ops.append(("prelu", _np(mod.prelu.weight)))
            else:
                self.ops.append(("bn", _fold(mod.batchnorm)))
        self.fused = fuse and [k for k, _ in self.ops] == ["bn", "relu"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (any view) -> a new contiguous array."""
        kernel = _bn_relu_kernel() if self.fused and x.ndim >= 2 else None
        if kernel is not None:
            scale, shift = self.ops[0][1]
            out = np.empty(x.shape, F32)
            c = x.shape[-1]
            x2 = x.reshape(-1, c)  # merges the leading axes without a copy for the views used here
            kernel(x2, scale, shift, out.reshape(-1, c))
            return out
        out = None
        for kind, p in self.ops:
            src = x if out is None else out
            if kind == "bn":
                y = np.multiply(src, p[0], out=out)
                y += p[1]
            elif kind == "relu":
                y = np.maximum(src, 0, out=out)
            else:
                y = np.where(src >= 0, src, src * p)
            out = y
        return x.copy() if out is None else out


class CPUCAMPPlus:
    """CAM++ in NumPy for the CPU backend: `embed(features [B, T, F] or [T, F]) -> [B, E] / [E]`."""

    description = "numpy + BLAS (asr.backends.cpu.campplus)"

    def __init__(self, net: CAMPPlus, blas: cpu_blas.Blas | None = None, fuse: bool = True, workers: int = 1):
        """fuse: BatchNorm + ReLU in one Numba pass where Numba is installed (False: NumPy's three passes).
        workers: `embed` splits a batch over this many threads, the loaded BLAS on one thread meanwhile (1: the
        caller's thread and the BLAS's own threads; used only with the loaded BLAS)."""
        self.config = net.config
        self.fuse = fuse
        self.blas = blas or cpu_blas.Blas.loaded()
        loaded = self.blas is cpu_blas.Blas.loaded() and self.blas.sgemm is not None and cpu_blas.can_serialize()
        self.workers = max(1, int(workers)) if loaded else 1
        h = net.head
        self.stem = self._conv(h.conv1.weight, h.bn1)  # (taps [3, 3, O, 1], shift)
        self.layer1 = [self._block(b) for b in h.layer1]
        self.layer2 = [self._block(b) for b in h.layer2]
        self.conv2 = self._conv(h.conv2.weight, h.bn2)
        xv = net.xvector
        w = _np(xv.tdnn.linear.weight)  # [O, k, I]
        self.tdnn = (w.reshape(w.shape[0], -1), xv.tdnn.linear.stride, xv.tdnn.linear.padding, w.shape[1])
        self.tdnn_nl = _Nonlinear(xv.tdnn.nonlinear, fuse)
        self.blocks, self.transits = [], []
        for i, (layers, _kernel, dilation) in enumerate(DENSE_BLOCKS):
            blk = getattr(xv, f"block{i + 1}")
            self.blocks.append([self._dense_layer(getattr(blk, f"tdnnd{j + 1}"), dilation) for j in range(layers)])
            tr = getattr(xv, f"transit{i + 1}")
            self.transits.append((_Nonlinear(tr.nonlinear, fuse), self._w1x1(tr.linear.weight)))
        self.out_nl = _Nonlinear(xv.out_nonlinear, fuse)
        self.dense = (self._w1x1(xv.dense.linear.weight), _Nonlinear(xv.dense.nonlinear, fuse))

    # --- preparation -----------------------------------------------------------------------------------------
    @staticmethod
    def _w1x1(w) -> np.ndarray:
        w = _np(w)
        return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[-1]))  # [O, I]

    @staticmethod
    def _conv(w, bn) -> tuple[np.ndarray, np.ndarray]:
        """A convolution [O, kh, kw, I] followed by its BatchNorm: taps [kh, kw, O, I] scaled by the BN, and the
        BN's shift."""
        scale, shift = _fold(bn)
        taps = _np(w).transpose(1, 2, 0, 3) * scale[None, None, :, None]
        return np.ascontiguousarray(taps, dtype=F32), shift

    def _block(self, b) -> dict:
        out = {"conv1": self._conv(b.conv1.weight, b.bn1), "stride": b.conv1.stride_f,
               "conv2": self._conv(b.conv2.weight, b.bn2)}
        if "shortcut" in b:
            taps, shift = self._conv(b.shortcut[0].weight, b.shortcut[1])
            out["short"] = (np.ascontiguousarray(taps[0, 0]), shift)
        return out

    def _dense_layer(self, layer, dilation: int) -> dict:
        cam = layer.cam_layer
        w = _np(cam.linear_local.weight)  # [O, k, I]
        return {"nl1": _Nonlinear(layer.nonlinear1, self.fuse), "w1": self._w1x1(layer.linear1.weight),
                "nl2": _Nonlinear(layer.nonlinear2, self.fuse), "local": np.ascontiguousarray(w.transpose(1, 0, 2)),
                "dilation": dilation, "pad": cam.linear_local.padding,
                "m1": (self._w1x1(cam.linear1.weight), _np(cam.linear1.bias)),
                "m2": (self._w1x1(cam.linear2.weight), _np(cam.linear2.bias))}

    # --- products ----------------------------------------------------------------------------------------------
    def _mm(self, a: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, beta: float = 0.0) -> np.ndarray:
        """out (+)= a @ w.T for a [M, K] with contiguous rows and w [N, K]."""
        if out is None:
            out = np.empty((a.shape[0], w.shape[0]), F32)
        return cpu_blas.gemm(a, w, out, beta=beta, blas=self.blas)

    # The FCM head works on zero-bordered buffers P [B, F+2, T+2, C] (the activation inside). Flattened to rows, the
    # output at (f, t) sits at row r + (T+2) + 1 of its own buffer, where r = (b, f, t) on the input planes' grid,
    # and a 3x3 tap (i, j) reads input row r + i(T+2) + j: every tap is one product on contiguous rows.
    @staticmethod
    def _pad(x: np.ndarray) -> np.ndarray:
        b, f, t, c = x.shape
        p = np.zeros((b, f + 2, t + 2, c), F32)
        p[:, 1:-1, 1:-1] = x
        return p

    @staticmethod
    def _planes(p: np.ndarray, stride: int) -> tuple[list[np.ndarray], list[tuple[int, int]], int]:
        """The input planes of a 3x3 convolution over P, each on the output's grid [B, F'+2, T+2], and for each tap
        row i its (plane, shift in rows of T+2); and F'."""
        if stride == 1:
            return [p], [(0, 0), (0, 1), (0, 2)], p.shape[1] - 2
        b, fp, tp, c = p.shape
        fo = (fp - 3) // 2 + 1  # output row f reads padded rows 2f, 2f+1, 2f+2: even[f], odd[f], even[f+1]
        even = np.zeros((b, fo + 2, tp, c), F32)
        odd = np.zeros((b, fo + 2, tp, c), F32)
        even[:, :fo + 1] = p[:, 0:2 * fo + 1:2]
        odd[:, :fo] = p[:, 1:2 * fo:2]
        return [even, odd], [(0, 0), (1, 0), (0, 1)], fo

    def _conv_bn(self, p: np.ndarray, conv: tuple[np.ndarray, np.ndarray], stride: int, *, relu: bool,
                 residual: np.ndarray | None = None, short: tuple | None = None,
                 planes: tuple | None = None) -> np.ndarray:
        """relu?(BN(conv3x3(P)) [+ the residual buffer of the same grid] [+ BN(conv1x1 stride 2)(block input)]) as a
        new bordered buffer. short: (weights [O, C], BN shift, the block input's odd plane); planes: `_planes(P)`."""
        taps, shift = conv
        planes_, taps_at, fo = planes or self._planes(p, stride)
        b, _fp, tp, c = planes_[0].shape
        o = taps.shape[2]
        out = np.empty((b, fo + 2, tp, o), F32)
        flat_out = out.reshape(-1, o)
        m = flat_out.shape[0] - 2 * tp - 2  # rows every tap can read; every output kept is in [tp + 1, tp + 1 + m)
        dst = flat_out[tp + 1: tp + 1 + m]
        if residual is not None:
            np.add(residual.reshape(-1, o)[tp + 1: tp + 1 + m], shift, out=dst)
        else:
            dst[...] = shift if short is None else shift + short[1]
        if short is not None:  # output (f, t) <- the block input's row 2f (odd plane row f), column t + 1
            odd = short[2]
            self._mm(odd.reshape(-1, odd.shape[-1])[1: 1 + m], short[0], dst, beta=1.0)
        flat_in = [q.reshape(-1, c) for q in planes_]
        for i, (plane, shift_rows) in enumerate(taps_at):
            for j in range(3):
                off = shift_rows * tp + j
                self._mm(flat_in[plane][off: off + m], taps[i, j], dst, beta=1.0)
        if relu:
            np.maximum(dst, 0, out=dst)
        self._zero_border(out, flat_out, tp, m)
        return out

    @staticmethod
    def _zero_border(out: np.ndarray, flat: np.ndarray, tp: int, m: int) -> None:
        flat[: tp + 1] = 0
        flat[tp + 1 + m:] = 0
        out[:, 0] = 0
        out[:, -1] = 0
        out[:, :, 0] = 0
        out[:, :, -1] = 0

    def _res_block(self, blk: dict, p: np.ndarray) -> np.ndarray:
        planes = self._planes(p, blk["stride"])
        h = self._conv_bn(p, blk["conv1"], blk["stride"], relu=True, planes=planes)
        if "short" in blk:
            w, s_shift = blk["short"]
            return self._conv_bn(h, blk["conv2"], 1, relu=True, short=(w, s_shift, planes[0][1]))
        return self._conv_bn(h, blk["conv2"], 1, relu=True, residual=p)

    def _stem(self, feats: np.ndarray) -> np.ndarray:
        """conv1 (one input channel: its 9 taps side by side, one product) + BN + ReLU -> P [B, F+2, T+2, 32]."""
        x = np.ascontiguousarray(np.asarray(feats, F32).transpose(0, 2, 1))  # [B, F, T]
        b, f, t = x.shape
        tp = t + 2
        p0 = np.zeros((b, f + 2, tp), F32)
        p0[:, 1:-1, 1:-1] = x
        flat0 = p0.reshape(-1)
        n = flat0.shape[0]
        m = n - 2 * tp - 2
        cols = np.empty((m, 9), F32)
        for i in range(3):
            for j in range(3):
                cols[:, 3 * i + j] = flat0[i * tp + j: i * tp + j + m]
        taps, shift = self.stem
        w = np.ascontiguousarray(taps.reshape(9, -1).T)  # [O, 9]
        out = np.empty((b, f + 2, tp, w.shape[0]), F32)
        flat = out.reshape(-1, w.shape[0])
        dst = flat[tp + 1: tp + 1 + m]
        dst[...] = shift
        self._mm(cols, w, dst, beta=1.0)
        np.maximum(dst, 0, out=dst)
        self._zero_border(out, flat, tp, m)
        return out

    def _layer1(self, feats: np.ndarray) -> np.ndarray:
        p = self._stem(feats)
        for blk in self.layer1:
            p = self._res_block(blk, p)
        return p

    def _layer2(self, p: np.ndarray) -> np.ndarray:
        for blk in self.layer2:
            p = self._res_block(blk, p)
        return p

    def _head_out(self, p: np.ndarray) -> np.ndarray:
        x = self._conv_bn(p, self.conv2, 2, relu=True)[:, 1:-1, 1:-1]  # [B, F/8, T, 32]
        b, f, t, c = x.shape
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(b, t, c * f)

    # the stage API (the reference's layouts, no borders)
    def stem_layer1(self, feats: np.ndarray) -> np.ndarray:
        return self._layer1(feats)[:, 1:-1, 1:-1]

    def run_layer2(self, x: np.ndarray) -> np.ndarray:
        return self._layer2(self._pad(np.asarray(x, F32)))[:, 1:-1, 1:-1]

    def head_out(self, x: np.ndarray) -> np.ndarray:
        return self._head_out(self._pad(np.asarray(x, F32)))

    def _tdnn(self, x: np.ndarray) -> np.ndarray:
        w, stride, pad, k = self.tdnn
        b, t, c = x.shape
        xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
        t_out = (t + 2 * pad - k) // stride + 1
        cols = np.concatenate([xp[:, j: j + stride * (t_out - 1) + 1: stride] for j in range(k)], axis=-1)
        y = self._mm(cols.reshape(-1, k * c), w).reshape(b, t_out, -1)
        return self.tdnn_nl(y)

    def _context(self, a: np.ndarray) -> np.ndarray:
        """The CAM layer's context per segment: utterance mean + segment mean, [B, n_seg, C]."""
        b, t, c = a.shape
        n = -(-t // SEG_LEN)
        sums = np.add.reduceat(a, np.arange(0, t, SEG_LEN), axis=1)
        counts = np.full(n, SEG_LEN, F32)
        counts[-1] = t - SEG_LEN * (n - 1)
        return a.mean(axis=1, keepdims=True, dtype=F32) + sums / counts[None, :, None]

    def _dense_block(self, layers: list[dict], x: np.ndarray) -> np.ndarray:
        b, t, c0 = x.shape
        growth = layers[0]["local"].shape[1]
        buf = np.empty((b, t, c0 + growth * len(layers)), F32)
        buf[..., :c0] = x
        c = c0
        for L in layers:
            h = L["nl1"](buf[..., :c]).reshape(b * t, c)
            a = L["nl2"](self._mm(h, L["w1"])).reshape(b, t, -1)
            # the local TDNN: 3 taps at offsets 0, d, 2d of the time-padded rows
            d, pad = L["dilation"], L["pad"]
            tp = t + 2 * pad
            ap = np.zeros((b, tp, a.shape[-1]), F32)
            ap[:, pad:pad + t] = a
            flat = ap.reshape(b * tp, -1)
            k = L["local"].shape[0]
            n = b * tp - (k - 1) * d
            y = np.empty((b * tp, growth), F32)
            for j in range(k):
                self._mm(flat[j * d: j * d + n], L["local"][j], y[:n], beta=0.0 if j == 0 else 1.0)
            y = y.reshape(b, tp, growth)[:, :t]
            ctx = self._context(a)
            n_seg = ctx.shape[1]
            (w1, b1), (w2, b2) = L["m1"], L["m2"]
            m = self._mm(ctx.reshape(b * n_seg, -1), w1)
            m += b1
            np.maximum(m, 0, out=m)
            m = self._mm(m, w2)
            m += b2
            m = 1.0 / (1.0 + np.exp(-m))
            m = np.repeat(m.reshape(b, n_seg, growth), SEG_LEN, axis=1)[:, :t]
            np.multiply(y, m, out=buf[..., c:c + growth])
            c += growth
        return buf

    def _transit(self, i: int, x: np.ndarray) -> np.ndarray:
        nl, w = self.transits[i]
        b, t, c = x.shape
        return self._mm(nl(x).reshape(b * t, c), w).reshape(b, t, -1)

    @staticmethod
    def _stats(x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=1, dtype=F32)
        var = np.square(x - mean[:, None, :]).sum(axis=1, dtype=F32) / F32(x.shape[1] - 1)
        return np.concatenate([mean, np.sqrt(var)], axis=-1)

    def run_stage(self, name: str, x) -> np.ndarray:
        """One stage of asr.speaker.campplus.STAGES, in the reference's layouts."""
        x = np.asarray(x, F32)
        if name == "head.layer1":
            return self.stem_layer1(x)
        if name == "head.layer2":
            return self.run_layer2(x)
        if name == "head":
            return self.head_out(x)
        if name == "xvector.tdnn":
            return self._tdnn(x)
        if name.startswith("xvector.block"):
            return self._dense_block(self.blocks[int(name[-1]) - 1], x)
        if name.startswith("xvector.transit"):
            return self._transit(int(name[-1]) - 1, x)
        if name == "xvector.out_nonlinear":
            return self.out_nl(x)
        if name == "xvector.stats":
            return self._stats(x)
        if name == "xvector.dense":
            w, nl = self.dense
            return nl(self._mm(np.ascontiguousarray(x), w))
        raise KeyError(f"unknown CAM++ stage {name!r}; stages: {STAGES}")

    def forward_stages(self, feats) -> dict[str, np.ndarray]:
        x = np.asarray(feats, F32)
        x = x[None] if x.ndim == 2 else x
        check_features(x.shape, self.config.feat_dim)
        out = {}
        for name in STAGES:
            x = out[name] = self.run_stage(name, x)
        return out

    def embed(self, feats) -> np.ndarray:
        """Embedding [E] of features [T, F], or [B, E] of [B, T, F] (equal lengths)."""
        x = np.asarray(feats, F32)
        one = x.ndim == 2
        x = x[None] if one else x
        check_features(x.shape, self.config.feat_dim)
        n = min(self.workers, x.shape[0])
        if n > 1:
            with cpu_blas.loaded_serial(), ThreadPoolExecutor(n) as pool:
                out = np.concatenate(list(pool.map(self._embed, np.array_split(x, n))))
        else:
            out = self._embed(x)
        return out[0] if one else out

    def embed_samples(self, samples) -> np.ndarray:
        """[B, E] embeddings of B windows of 16 kHz samples [B, N]: the reference frontend, then `embed`."""
        return self.embed(features(samples, self.config.feat_dim))

    def _embed(self, x: np.ndarray) -> np.ndarray:
        x = self._head_out(self._layer2(self._layer1(x)))
        for name in STAGES[STAGES.index("head") + 1:]:
            x = self.run_stage(name, x)
        return x
