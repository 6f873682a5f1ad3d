"""CAM++ under `mx.compile`: the reference network (asr.speaker.campplus) traced once per batch shape, so that its
elementwise operations (BatchNorm, ReLU, the context mask's sigmoid and product) run fused instead of as ~2,000
separate kernels a batch; for the diarization's windows the frontend (fbank, mean removal) is compiled with it.
Same operations, same weights; what changes is how many kernels the device runs.

Batches over `step` windows are padded with zero rows up to a multiple of it (and cut back after), so that a diarization
traces at most batch / step shapes over the life of the process instead of one per remainder. Shapes other than
[B, T, F] batches (one utterance, stage by stage) go to the plain network.
"""

from __future__ import annotations

import mlx.core as mx

from ...speaker.campplus import CAMPPlus, check_features, features

STEP = 32  # windows: batch sizes are padded up to a multiple of this


class CompiledCAMPPlus:
    """`embed(feats)` as CAMPPlus.embed, the batch compiled; everything else is the network's."""

    def __init__(self, net: CAMPPlus, step: int = STEP):
        self.net = net
        self.config = net.config
        self.step = step
        self._embed = mx.compile(net.embed)
        self._embed_samples = mx.compile(lambda x: net.embed(features(x, self.config.feat_dim)))

    def run_stage(self, name: str, x: mx.array) -> mx.array:
        return self.net.run_stage(name, x)

    def forward_stages(self, feats: mx.array) -> dict[str, mx.array]:
        return self.net.forward_stages(feats)

    def embed(self, feats: mx.array) -> mx.array:
        if feats.ndim != 3:
            return self.net.embed(feats)
        check_features(feats.shape, self.config.feat_dim)
        return self._padded(self._embed, feats)

    def embed_samples(self, samples: mx.array) -> mx.array:
        """[B, E] embeddings of B windows of 16 kHz samples [B, N] (one length): the frontend and the network
        compiled together (asr.speaker.campplus.features, then embed, which checks the features' shape)."""
        return self._padded(self._embed_samples, samples)

    def _padded(self, fn, x: mx.array) -> mx.array:
        b = x.shape[0]
        padded = b if b <= self.step else -(-b // self.step) * self.step
        if padded != b:
            x = mx.concatenate([x, mx.zeros((padded - b, *x.shape[1:]), x.dtype)])
        return fn(x)[:b]
