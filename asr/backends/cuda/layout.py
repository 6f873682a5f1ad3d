"""fp32 linear layers with their weights stored [in, out], for MLX's CUDA backend (the audio path: encoder, adaptor,
CTC decoder).

MLX 0.32 runs fp32 products on CUDA as cuBLAS TF32 products. For nn.Linear's x @ W.T with W stored [out, in] (cuBLAS's
"tn" case) cuBLAS picks an sm90 kernel that it launches with a thread-block cluster MLX cannot update inside a cached
CUDA graph, so MLX instantiates a new graph for every command buffer holding one and destroys it after the launch,
which waits for the GPU: the host cannot run ahead. With the weight stored [in, out] (x @ Wt, the "nn" case) cuBLAS
picks the same class of TF32 kernel and MLX updates its cached graphs in place. fp32 encoder of 64 segments on an
H200: 18 graphs instantiated, 82.6 ms; stored [in, out] with addmm: none, 65.1 ms.

Same products (TF32, fp32 accumulation, the bias added in the product's epilogue as nn.Linear does), so results
agree with nn.Linear's to rounding. Not used off CUDA: CPU BLAS and Metal have no such cost.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map


class LinearNN(nn.Module):
    """y = x @ weight_t + bias with weight_t [in, out] (nn.Linear's weight transposed, stored contiguous)."""

    def __init__(self, weight_t: mx.array, bias: mx.array | None):
        super().__init__()
        self.weight_t = weight_t
        if bias is not None:
            self.bias = bias

    @classmethod
    def of(cls, linear: nn.Linear) -> LinearNN:
        weight_t = mx.contiguous(linear.weight.T)
        mx.eval(weight_t)
        return cls(weight_t, linear.get("bias"))

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self["bias"], x, self.weight_t)
        return x @ self.weight_t


def replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module | None],
                    skip: tuple[str, ...] = ()) -> int:
    """Replace every unquantized nn.Linear under `module` (but not under its children named in `skip`) by
    `make(linear)` where that is not None; return how many were replaced."""
    count = 0

    def swap(m: nn.Module) -> nn.Module:
        nonlocal count
        new = make(m) if type(m) is nn.Linear else None
        if new is None:
            return m
        count += 1
        return new

    leaves = module.leaf_modules()
    module.update_modules({k: v if k in skip else tree_map(swap, v, is_leaf=nn.Module.is_module)
                           for k, v in leaves.items()})
    return count


def use_nn_layout(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every fp32, unquantized nn.Linear under `module` (but not under its children named in `skip`) by its
    LinearNN; return how many were replaced."""

    def make(m: nn.Linear) -> LinearNN | None:
        if m.weight.dtype != mx.float32:
            return None
        new = LinearNN.of(m)
        del m["weight"]  # the [out, in] copy goes now, not after the last layer: one extra weight at a time
        return new

    return replace_linears(module, make, skip)
