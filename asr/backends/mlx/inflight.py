"""A bound on how much of a deep lazy graph a GPU may have queued at once.

MLX runs a lazy graph by encoding its operations for the device as fast as the host can, and every operation's
inputs stay allocated until the device has run it. Where the device is the slower side, the host queues up to
~1,000 operations ahead (MLX lets 10 command buffers be in flight; asr.backends.cuda.env puts 100 operations in
each), so nearly every intermediate of a deep network is alive at once. A batch of 64 segments of 11 s through the 70-layer
encoder held 18 GB that way on an H200, for an output of 24 MB (docs/performance.md, "Memory of a batch").

`InFlight` evaluates such a graph in chunks of layers: after each chunk it starts the chunk (async_eval) and waits
for the one before, so the device always has the next chunk queued while at most two chunks' intermediates are
alive. The chunk is sized from an estimate of one layer's intermediates, and capped at RuntimeOptions.inflight_layers
layers (16): below the byte budget a small batch's products still keep their workspaces and temporaries until the
device has run them (~150 MB for the whole encoder at batch 1 on an H100; docs/performance.md). The values are the
same either way: only when things run changes.
"""

from __future__ import annotations

import mlx.core as mx


class InFlight:
    """Call it on each layer's output, in order: it returns the output unchanged and, every `every` layers, hands
    the graph so far to the device and waits for the previous chunk.

    layer_bytes: an estimate (an upper bound is safer) of the intermediates one layer allocates; budget: bytes of
    two chunks' intermediates (RuntimeOptions.inflight_mb), 0 for no bound; max_layers: at most this many layers a
    chunk whatever their size (RuntimeOptions.inflight_layers), 0 for no cap."""

    def __init__(self, layer_bytes: int, budget: int, max_layers: int = 0) -> None:
        self.every = max(1, budget // (2 * max(1, layer_bytes))) if budget > 0 else 0
        if max_layers > 0:
            self.every = min(self.every, max_layers) if self.every else max_layers
        self._count = 0
        self._pending: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        self._count += 1
        if self.every and self._count % self.every == 0:
            self.hand_over(x)
        return x

    def hand_over(self, x: mx.array) -> None:
        """Start the graph up to x on the device, and wait for the chunk before it."""
        mx.async_eval(x)
        if self._pending is not None:
            mx.eval(self._pending)  # already scheduled: this waits for the device to finish it
        self._pending = x
