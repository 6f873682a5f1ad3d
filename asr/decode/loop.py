"""The one greedy decode loop, for every backend: prefill through the runner, then its step until each row stops
(end of sequence, the token limit, or a degenerate repetition), honouring cancellation.

Reference: funasr/models/fun_asr_nano/model.py::inference_llm (`llm.generate(inputs_embeds=...)` with the bare
default generation config: greedy, stop on eos, max_new_tokens=512). The repetition guard is ours.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import mlx.core as mx

from ..errors import TranscriptionCancelled
from .runner import LLMRunner, Step

SYNC_EVERY = 8  # decode steps queued lazily per host sync (token-exact: steps past a row's stop are dropped)


@dataclass
class DecodeResult:
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "repetition"
    prefill_s: float
    decode_s: float
    prompt_tokens: int


def left_pad(prompts: list[mx.array]) -> tuple[mx.array, list[int]]:
    """Prompts [P_i, D] left-padded with zeros into [B, max P_i, D], and their lengths."""
    lengths = [int(p.shape[0]) for p in prompts]
    P = max(lengths)
    return mx.stack([mx.pad(p, [(P - n, 0), (0, 0)]) for p, n in zip(prompts, lengths, strict=True)]), lengths


def greedy(runner: LLMRunner, prompts: mx.array, lengths: list[int], *, eos_ids: set[int], max_new_tokens: int,
           cancel: threading.Event | None = None, repetition_guard: bool = True) -> list[DecodeResult]:
    """Greedy decoding of prompts left-padded into [B, P, D] (row b's prompt is its last lengths[b] rows).

    Each row gets the positions and causal attention it has when decoded alone, so its tokens equal one-by-one
    decoding (up to float summation order)."""
    t0 = time.perf_counter()
    first, step = runner.start(prompts, lengths)
    mx.eval(first)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens, finish = _loop(step, first, len(lengths), eos_ids, max_new_tokens, cancel, repetition_guard)
    decode_s = time.perf_counter() - t1
    return [DecodeResult(tokens=t, finish_reason=f, prefill_s=prefill_s, decode_s=decode_s, prompt_tokens=n)
            for t, f, n in zip(tokens, finish, lengths, strict=True)]


def find_loop(tokens: list[int], max_period: int = 32, min_span: int = 32, min_repeats: int = 4) -> int | None:
    """If `tokens` ends in a degenerate loop, return the length to keep (up to the loop's first copy).

    A loop is the last p tokens repeated k times back to back, with k >= min_repeats and p*k >= min_span
    (e.g. one token 32 times, a 4-token phrase 8 times, a 16-token sentence 4 times).
    """
    n = len(tokens)
    for p in range(1, max_period + 1):
        k_needed = max(min_repeats, -(-min_span // p))
        if p * k_needed > n:
            break
        unit = tokens[n - p:]
        if all(tokens[n - (i + 1) * p: n - i * p] == unit for i in range(1, k_needed)):
            k = k_needed
            while p * (k + 1) <= n and tokens[n - (k + 1) * p: n - k * p] == unit:
                k += 1
            return n - (k - 1) * p
    return None


def _loop(step: Step, first: mx.array, batch: int, eos_ids: set[int], max_new_tokens: int,
          cancel: threading.Event | None, repetition_guard: bool) -> tuple[list[list[int]], list[str]]:
    """Run `step` from `first`, reading tokens back every SYNC_EVERY steps.

    Each step is handed to the device as soon as it is built (async_eval), so the device works while Python
    builds the next one; the host waits only at a sync. Steps past a row's stop are computed but dropped.
    """
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    active = set(range(batch))
    cur, produced = first, 0
    while active and produced < max_new_tokens:
        if cancel is not None and cancel.is_set():
            raise TranscriptionCancelled("transcription cancelled")
        seq = [cur]
        mx.async_eval(cur)
        for _ in range(min(SYNC_EVERY, max_new_tokens - produced) - 1):
            seq.append(step(seq[-1]))
            mx.async_eval(seq[-1])
        block = mx.stack(seq, axis=1).tolist()  # [B, k]: the one host sync of this block
        produced += len(seq)
        for b in sorted(active):
            out = tokens[b]
            for tok in block[b]:
                if tok in eos_ids:
                    finish[b] = "stop"
                    break
                out.append(tok)
                if repetition_guard and (keep := find_loop(out)) is not None:
                    del out[keep:]
                    finish[b] = "repetition"
                    break
                if len(out) >= max_new_tokens:
                    break
            if finish[b] != "length" or len(out) >= max_new_tokens:
                active.discard(b)
        if active and produced < max_new_tokens:
            cur = step(seq[-1])
    return tokens, finish
