"""Speaker embeddings: CAM++ (`campplus`, the network and its fbank frontend in MLX) and `load` (an official
`iic/speech_campplus_sv_zh-cn_16k-common` directory or hub id -> converted once -> the network).

Import the modules by name (`from asr.speaker.load import load_campplus`): this package imports no MLX itself.
"""
