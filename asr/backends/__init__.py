"""The backends: `mlx` (the reference: MLX operations, what Apple Silicon runs), `cpu` (NumPy and BLAS runners),
`cuda` (custom CUDA kernels), chosen once at load by `select`. This package imports nothing itself: `asr` loads the
CPU BLAS (cpu.blas_load) and the CUDA settings (cuda.env) from here before MLX is imported."""
