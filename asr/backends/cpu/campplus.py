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

import numpy as np

from ...speaker.campplus import DENSE_BLOCKS, SEG_LEN, STAGES, CAMPPlus
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


class _Nonlinear:
    """get_nonlinear's ops in order: batchnorm (folded), relu, prelu."""

    def __init__(self, mod):
        self.ops = []
        for op in mod.config_str.split("-"):
            if op == "relu":
                self.ops.append(("relu", None))
            elif op == "prelu":
                self.ops.append(("prelu", _np(mod.prelu.weight)))
            else:
                self.ops.append(("bn", _fold(mod.batchnorm)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (any view) -> a new contiguous array."""
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

    def __init__(self, net: CAMPPlus, blas: cpu_blas.Blas | None = None):
        self.config = net.config
        self.blas = blas or cpu_blas.Blas.loaded()
        h = net.head
        self.conv1 = self._taps2d(h.conv1.weight)
        self.bn1 = _fold(h.bn1)
        self.layer1 = [self._block(b) for b in h.layer1]
        self.layer2 = [self._block(b) for b in h.layer2]
        self.conv2 = self._taps2d(h.conv2.weight)
        self.bn2 = _fold(h.bn2)
        xv = net.xvector
        w = _np(xv.tdnn.linear.weight)  # [O, k, I]
        self.tdnn = (w.reshape(w.shape[0], -1), xv.tdnn.linear.stride, xv.tdnn.linear.padding, w.shape[1])
        self.tdnn_nl = _Nonlinear(xv.tdnn.nonlinear)
        self.blocks, self.transits = [], []
        for i, (layers, _kernel, dilation) in enumerate(DENSE_BLOCKS):
            blk = getattr(xv, f"block{i + 1}")
            self.blocks.append([self._dense_layer(getattr(blk, f"tdnnd{j + 1}"), dilation) for j in range(layers)])
            tr = getattr(xv, f"transit{i + 1}")
            self.transits.append((_Nonlinear(tr.nonlinear), self._w1x1(tr.linear.weight)))
        self.out_nl = _Nonlinear(xv.out_nonlinear)
        self.dense = (self._w1x1(xv.dense.linear.weight), _Nonlinear(xv.dense.nonlinear))

    # --- preparation -----------------------------------------------------------------------------------------
    @staticmethod
    def _w1x1(w) -> np.ndarray:
        w = _np(w)
        return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[-1]))  # [O, I]

    @staticmethod
    def _taps2d(w) -> np.ndarray:
        """[O, kh, kw, I] -> [kh, kw, O, I] (each tap's [O, I] contiguous)."""
        return np.ascontiguousarray(_np(w).transpose(1, 2, 0, 3))

    def _block(self, b) -> dict:
        out = {"conv1": self._taps2d(b.conv1.weight), "bn1": _fold(b.bn1), "stride": b.conv1.stride_f,
               "conv2": self._taps2d(b.conv2.weight), "bn2": _fold(b.bn2)}
        if "shortcut" in b:
            out["short"] = (self._w1x1(b.shortcut[0].weight), b.shortcut[0].stride_f, _fold(b.shortcut[1]))
        return out

    def _dense_layer(self, layer, dilation: int) -> dict:
        cam = layer.cam_layer
        w = _np(cam.linear_local.weight)  # [O, k, I]
        return {"nl1": _Nonlinear(layer.nonlinear1), "w1": self._w1x1(layer.linear1.weight),
                "nl2": _Nonlinear(layer.nonlinear2), "local": np.ascontiguousarray(w.transpose(1, 0, 2)),
                "dilation": dilation, "pad": cam.linear_local.padding,
                "m1": (self._w1x1(cam.linear1.weight), _np(cam.linear1.bias)),
                "m2": (self._w1x1(cam.linear2.weight), _np(cam.linear2.bias))}

    # --- products ----------------------------------------------------------------------------------------------
    def _mm(self, a: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, beta: float = 0.0) -> np.ndarray:
        """out (+)= a @ w.T for a [M, K] with contiguous rows and w [N, K]."""
        if out is None:
            out = np.empty((a.shape[0], w.shape[0]), F32)
        return cpu_blas.gemm(a, w, out, beta=beta, blas=self.blas)

    def _conv3x3(self, xp: np.ndarray, taps: np.ndarray, stride: int) -> np.ndarray:
        """A 3x3 convolution (padding 1, frequency stride 1 or 2) of the padded buffer xp [B, F+2, T+2, C]:
        [B, F', T, O]."""
        b, fp, tp, c = xp.shape
        f, t, o = fp - 2, tp - 2, taps.shape[2]
        if stride == 1:
            fo, planes = f, [xp]
            taps_at = [(0, 0), (0, 1), (0, 2)]  # tap row i: (plane, shift in units of T+2 rows)
        else:  # output row f reads padded rows 2f, 2f+1, 2f+2: even[f], odd[f], even[f+1]
            fo = (f - 1) // 2 + 1
            even = np.ascontiguousarray(xp[:, 0:2 * fo + 1:2])  # fo + 1 rows
            odd = np.zeros_like(even)
            odd[:, :fo] = xp[:, 1:2 * fo:2]
            planes, taps_at = [even, odd], [(0, 0), (1, 0), (0, 1)]
        flat = [p.reshape(-1, c) for p in planes]
        f_plane = planes[0].shape[1]  # output rows are laid out like the planes: r = (b, f, t) of [B, f_plane, T+2]
        n_out = b * f_plane * tp
        m = n_out - (taps_at[-1][1] * tp + 2)  # rows every tap can read; every output kept lies below
        out = np.empty((n_out, o), F32)
        first = True
        for i in range(3):
            plane, shift = taps_at[i]
            for j in range(3):
                off = shift * tp + j
                self._mm(flat[plane][off: off + m], taps[i, j], out[:m], beta=0.0 if first else 1.0)
                first = False
        return out.reshape(b, f_plane, tp, o)[:, :fo, :t]

    @staticmethod
    def _padded(x: np.ndarray) -> np.ndarray:
        b, f, t, c = x.shape
        xp = np.zeros((b, f + 2, t + 2, c), F32)
        xp[:, 1:-1, 1:-1] = x
        return xp

    @staticmethod
    def _bn(x: np.ndarray, p, relu: bool) -> np.ndarray:
        y = np.multiply(x, p[0])
        y += p[1]
        return np.maximum(y, 0, out=y) if relu else y

    def _res_block(self, blk: dict, x: np.ndarray) -> np.ndarray:
        out = self._bn(self._conv3x3(self._padded(x), blk["conv1"], blk["stride"]), blk["bn1"], True)
        out = self._bn(self._conv3x3(self._padded(out), blk["conv2"], 1), blk["bn2"], False)
        if "short" in blk:
            w, s, bn = blk["short"]
            xs = np.ascontiguousarray(x[:, ::s]) if s != 1 else x
            short = self._mm(xs.reshape(-1, xs.shape[-1]), w).reshape(*xs.shape[:3], w.shape[0])
            out += self._bn(short, bn, False)
        else:
            out += x
        return np.maximum(out, 0, out=out)

    # --- stages ------------------------------------------------------------------------------------------------
    def stem_layer1(self, feats: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(feats, F32).transpose(0, 2, 1))[..., None]  # [B, F, T, 1]
        b, f, t, _ = x.shape
        xp = self._padded(x)[..., 0]  # [B, F+2, T+2]
        cols = np.empty((b, f, t, 9), F32)  # one input channel: the 9 taps side by side are cheap
        for i in range(3):
            for j in range(3):
                cols[..., 3 * i + j] = xp[:, i:i + f, j:j + t]
        w = self.conv1.reshape(9, -1).T  # [O, 9]
        x = self._mm(cols.reshape(-1, 9), np.ascontiguousarray(w)).reshape(b, f, t, -1)
        x = self._bn(x, self.bn1, True)
        for blk in self.layer1:
            x = self._res_block(blk, x)
        return x

    def run_layer2(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, F32)
        for blk in self.layer2:
            x = self._res_block(blk, x)
        return x

    def head_out(self, x: np.ndarray) -> np.ndarray:
        x = self._bn(self._conv3x3(self._padded(np.asarray(x, F32)), self.conv2, 2), self.bn2, True)
        b, f, t, c = x.shape
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(b, t, c * f)

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
        out = {}
        for name in STAGES:
            x = out[name] = self.run_stage(name, x)
        return out

    def embed(self, feats) -> np.ndarray:
        """Embedding [E] of features [T, F], or [B, E] of [B, T, F] (equal lengths)."""
        x = np.asarray(feats, F32)
        one = x.ndim == 2
        x = x[None] if one else x
        for name in STAGES:
            x = self.run_stage(name, x)
        return x[0] if one else x
