"""Audio in: decoding and resampling (`io`), the fbank + LFR features (`features`), voice activity (`vad`).

This package's own names are `io`'s, which imports no MLX: the server probes and decodes files without loading
the model's libraries. `features` and `vad` compute on MLX and are imported by name.
"""

from .io import SAMPLE_RATE, Audio, AudioInfo, iter_audio_blocks, load_audio, probe

__all__ = ["SAMPLE_RATE", "Audio", "AudioInfo", "iter_audio_blocks", "load_audio", "probe"]
