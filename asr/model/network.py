"""The module tree holding every weight, named like the official state dict (see
asr.loading.checkpoint.official_key_to_mlx)."""

from __future__ import annotations

import mlx.nn as nn

from .adaptor import Adaptor
from .config import ModelConfig
from .encoder import SenseVoiceEncoder
from .llm import build_llm


class FunASRNanoNet(nn.Module):
    """All weights of the model, named like the official state dict (see checkpoint.official_key_to_mlx)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = SenseVoiceEncoder(cfg.encoder)
        self.adaptor = Adaptor(cfg.adaptor)
        self.llm = build_llm(cfg.llm, cfg.rope_bf16)
        if cfg.ctc is not None:
            self.ctc_decoder = Adaptor(cfg.ctc)
            self.ctc_lo = nn.Linear(cfg.ctc.llm_dim, cfg.ctc_vocab_size)
