"""Decoding: the runner protocol every backend implements (`runner`), the one greedy loop with its repetition guard
and cancellation (`loop`), and the KV-cache buffers of the MLX-based steps (`kv`)."""
