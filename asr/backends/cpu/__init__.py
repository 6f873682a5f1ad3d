"""The CPU backend (Linux): the encoder, adaptor and LLM in NumPy, every product a call into one optimised BLAS."""
