"""The reference backend: the model's own MLX operations, and mlx-lm's Qwen3 step. Apple Silicon (Metal) runs this."""
