"""Compile the project's custom CUDA kernels with NVRTC on a machine without a GPU (catches errors before GPU time).

Builds each kernel's source the way MLX 0.32's `mx.fast.cuda_kernel` does (its header, the signature from the
inputs' dtypes, the template constants), for every kernel a decode step creates, and compiles it for sm_90a to
PTX. The step runs on the CPU with every custom kernel replaced by a recorder that returns zeros of the right shape,
so the plumbing (shapes, dtypes, arguments) is exercised too.

Needs, outside the project (development only):
  pip download --no-deps -d /tmp/whl/nv "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*"
  pip install --no-deps --target /tmp/nvrtc /tmp/whl/nv/*.whl
  the mlx-cuda-13 wheel's mlx/include (unzip it to MLX_INCLUDE's parent) and MLX's device headers
  (mlx/backend/cuda/device/*.cuh of the matching MLX tag, under MLX_DEVICE)
Usage: NVRTC_ROOT=/tmp/nvrtc/nvidia/cu13 MLX_INCLUDE=/tmp/mlxinc/mlx/include MLX_DEVICE=/tmp/mlxdev \
       python tools/gpu/nvrtc_check.py [--dtypes bfloat16 float32]
"""

from __future__ import annotations  # noqa: I001 (asr before mlx)

import argparse
import ctypes
import os

import asr  # noqa: F401
import mlx.core as mx

from asr import cuda_decode

VERBOSE = bool(os.environ.get("PTXAS_VERBOSE"))  # compile to a cubin and print ptxas's registers / spills per kernel

_CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.int32: "int32_t",
               mx.uint32: "uint32_t", mx.uint64: "uint64_t"}
_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def build_source(name: str, header: str, source: str, input_names: list[str], inputs: list[mx.array],
                 output_names: list[str], output_dtypes: list, template: list) -> str:
    """The text MLX 0.32's custom_kernel.cpp (build_kernel) compiles for these arguments."""
    text = _DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    for n, a in zip(input_names, inputs, strict=True):
        text += f"    const {_CUDA_TYPES[a.dtype]}* {n},\n"
        if a.ndim > 0:  # MLX passes shape / strides / ndim where the source names them
            text += f"    const __grid_constant__ Shape {n}_shape,\n" if f"{n}_shape" in source else ""
            text += f"    const __grid_constant__ Strides {n}_strides,\n" if f"{n}_strides" in source else ""
            text += f"    const __grid_constant__ int {n}_ndim,\n" if f"{n}_ndim" in source else ""
    text += ",\n".join(f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(output_names, output_dtypes, strict=True)) + ") {\n"
    for key, value in template:
        if isinstance(value, bool):
            text += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
        elif isinstance(value, int):
            text += f"  constexpr int {key} = {value};\n"
        else:
            text += f"  using {key} = {_CUDA_TYPES[value]};\n"
    return text + "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"


class Nvrtc:
    def __init__(self, root: str, include: list[str]):
        lib = os.path.join(root, "lib")
        for name in sorted(os.listdir(lib)):  # the builtins library first, where nvrtc looks it up by name
            if name.startswith("libnvrtc-builtins.so"):
                ctypes.CDLL(os.path.join(lib, name), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
        arch = b"--gpu-architecture=sm_90a" if VERBOSE else b"--gpu-architecture=compute_90a"
        self.options = [b"--device-as-default-execution-space", arch]
        if VERBOSE:  # a cubin, with ptxas's registers / spills per kernel in the log
            self.options.append(b"--ptxas-options=-v")
        self.options += [f"--include-path={p}".encode() for p in include]

    def compile(self, source: str, name: str) -> tuple[bool, str]:
        prog = ctypes.c_void_p()
        assert self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None,
                                           None) == 0
        opts = (ctypes.c_char_p * len(self.options))(*self.options)
        rc = self.lib.nvrtcCompileProgram(prog, len(self.options), opts)
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, log)
        self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return rc == 0, log.value.decode(errors="replace")


class Recorder:
    """Stands in for mx.fast.cuda_kernel: records each distinct source, returns zeros of the output shapes."""

    seen: dict[str, str] = {}

    def __init__(self, name, input_names, output_names, source, header="", **_):
        self.name, self.input_names, self.output_names = name, input_names, output_names
        self.source, self.header = source, header

    def __call__(self, *, inputs, template, output_shapes, output_dtypes, grid, threadgroup, **_):
        assert len(inputs) == len(self.input_names), (self.name, len(inputs))
        assert grid[0] % threadgroup[0] == 0 and threadgroup[0] <= 1024, (grid, threadgroup)
        key = f"{self.name}_" + "_".join(str(v) for _, v in template)
        text = build_source(f"custom_kernel_{key}".replace(".", "_").replace("mlx_core_", ""), self.header,
                            self.source, self.input_names, inputs, self.output_names, output_dtypes, template)
        Recorder.seen[key] = text
        return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--show", action="store_true", help="print each source")
    ap.add_argument("--wide", action="store_true", help="Qwen3-0.6B's widths (2 layers) instead of the small model's")
    args = ap.parse_args()
    root = os.environ.get("NVRTC_ROOT", "/tmp/nvrtc/nvidia/cu13")
    inc = os.environ.get("MLX_INCLUDE", "/tmp/mlxinc/mlx/include")
    nvrtc = Nvrtc(root, [inc, os.path.join(inc, "cccl"), os.path.join(root, "include"),
                         os.environ.get("MLX_DEVICE", "/tmp/mlxdev")])

    from mlx_lm.models.cache import KVCache

    from asr import llm as L

    mx.fast.cuda_kernel = Recorder
    cuda_decode._kernels.clear()
    config = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, intermediate_size=768,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6, vocab_size=1000,
                  rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=4096)
    if args.wide:
        config.update(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                      vocab_size=151936)
    for dtype in args.dtypes:
        model = L.build_llm(config)
        model.set_dtype(getattr(mx, dtype))
        dec = L.FastDecoder(model)
        step = cuda_decode.FusedStep(model, dec._layer_plans())
        cache = [KVCache() for _ in model.layers]
        emb = mx.zeros((1, 5, config["hidden_size"]), dtype=getattr(mx, dtype))
        L.last_logits(model, mx.zeros((1, 5), dtype=mx.int32), cache, emb)
        kv = [[L._grow(c.keys[..., :5, :], 6), L._grow(c.values[..., :5, :], 6)] for c in cache]
        step._step = step._forward  # trace eagerly: the recorder runs on the CPU
        tok = step.start(kv, 5)(mx.array([1], dtype=mx.int32))
        mx.eval(tok)
        rows = cuda_decode.RowsStep(model, dec._layer_plans())
        rows._step = rows._forward
        kv3 = [[mx.repeat(k, 3, axis=0), mx.repeat(v, 3, axis=0)] for k, v in kv]
        mx.eval(rows.start(kv3, 5, [0, 2, 4])(mx.array([1, 2, 3], dtype=mx.int32)))
        from asr import cuda_persistent  # the one-launch step (132 SMs, as an H100/H200)

        one = cuda_persistent.PersistentStep(model, dec._layer_plans(), 132)
        mx.eval(one.start([[mx.array(k), mx.array(v)] for k, v in kv], 5)(mx.array([1], dtype=mx.int32)))
        from asr import cuda_rows  # the one-launch batched step (bf16 only), at 3 and 64 rows

        if cuda_rows.fits(model):
            rows1 = cuda_rows.PersistentRows(model, dec._layer_plans(), 132)
            for n in (3, 64):
                kvn = [[mx.repeat(k, n, axis=0), mx.repeat(v, n, axis=0)] for k, v in kv]
                mx.eval(rows1.start(kvn, 5, [0] * n)(mx.zeros((n,), dtype=mx.int32)))
        from asr import cuda_encoder  # the encoder's kernels (asr.encoder calls them with these shapes)

        qkv = mx.zeros((2, 7, 3 * 512), dtype=getattr(mx, dtype))
        valid = mx.array([7, 4], dtype=mx.int32)
        mx.eval(cuda_encoder.fsmn(qkv, mx.zeros((512, 11, 1), dtype=qkv.dtype), valid, 5),
                cuda_encoder.attend(qkv, valid, 4, 128**-0.5))
    failed = 0
    for key, text in Recorder.seen.items():
        ok, log = nvrtc.compile(text, key)
        print(f"{'ok  ' if ok else 'FAIL'} {key}")
        if VERBOSE and ok:
            print("   ", " ".join(line.strip() for line in log.splitlines() if "registers" in line or "spill" in line))
        if args.show or not ok:
            print(text if args.show else "", log)
        failed += not ok
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
