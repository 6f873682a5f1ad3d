"""The CUDA backend: custom kernels (sources in sources/) for the encoder's attention and FSMN and for the decode steps."""
