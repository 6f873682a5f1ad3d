"""Who spoke when, the official pipeline's way: windows over the speech, an embedding per window, clusters, turns.

The geometry and the post-processing are those of funasr 1.4.16 (`funasr/models/campplus/utils.py`: `sv_chunk`,
`postprocess` with `correct_labels`, `merge_seque`, `smooth`, and `distribute_spk`), re-written here in NumPy and
checked equal to it (tests/test_speaker_diarize.py):

1. windows: every speech span is cut into 1.5 s windows every 0.75 s (the last one ends at the span's end; a span
   shorter than 1.5 s gives one window, zero-padded to 1.5 s);
2. an embedding per window (CAM++: asr.speaker.campplus; any `embed(list of 16 kHz windows) -> [N, D]` runner);
3. labels from the clustering backend (asr.speaker.cluster; `num_speakers` fixes their number);
4. turns: labels renumbered by first appearance, consecutive windows of one speaker merged, overlaps between turns
   split at their middle, turns under 0.7 s given to the nearest neighbour, merged again;
5. `speaker_of(start, end, turns)`: the speaker with the most overlap with a stretch of audio (distribute_spk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..audio.io import SAMPLE_RATE

WINDOW_S = 1.5
SHIFT_S = 0.75
MIN_TURN_S = 0.7


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: int


def windows(spans: Sequence[tuple[float, float]], samples: np.ndarray,
            sample_rate: int = SAMPLE_RATE) -> list[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, window samples) for every speech span, as the official sv_chunk cuts them."""
    out = []
    for span in span_samples(spans, samples, sample_rate):
        out += span_windows(*span, sample_rate=sample_rate)
    return out


def span_samples(spans: Sequence[tuple[float, float]], samples: np.ndarray,
                 sample_rate: int = SAMPLE_RATE) -> Iterator[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, the span's samples) for each span of in-memory audio (what `span_windows` takes)."""
    for start, end in spans:
        yield start, end, samples[sample_index(start, sample_rate): sample_index(end, sample_rate)]


def sample_index(t: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Where a span's time falls in the samples (the official code rounds)."""
    return int(round(t * sample_rate))


def span_windows(span_start: float, span_end: float, data: np.ndarray,
                 sample_rate: int = SAMPLE_RATE) -> list[tuple[float, float, np.ndarray]]:
    """The windows of one speech span whose samples are `data` (see the module docstring, step 1)."""
    out = []
    size, shift = int(WINDOW_S * sample_rate), int(SHIFT_S * sample_rate)
    last_end = 0
    for start in range(0, data.shape[0], shift):
        end = min(start + size, data.shape[0])
        if end <= last_end:
            break
        last_end = end
        start = max(0, end - size)
        chunk = data[start:end]
        if chunk.shape[0] < size:
            chunk = np.pad(chunk, (0, size - chunk.shape[0]))
        out.append((start / sample_rate + span_start, end / sample_rate + span_start, chunk))
    return out


def turns_from_labels(times: Sequence[tuple[float, float]], labels: Sequence[int]) -> list[Turn]:
    """The official postprocess: windows with labels -> speaker turns (see the module docstring, step 4)."""
    if len(times) != len(labels):
        raise ValueError(f"{len(times)} windows but {len(labels)} labels")
    if not times:
        return []
    renumber: dict[int, int] = {}
    rows = [[float(s), float(e), renumber.setdefault(int(lab), len(renumber))] for (s, e), lab in zip(times, labels,
                                                                                                   strict=True)]
    rows = _merge(rows)
    for i in range(1, len(rows)):  # overlapping turns meet at the middle of the overlap
        if rows[i - 1][1] > rows[i][0] + 1e-4:
            middle = (rows[i][0] + rows[i - 1][1]) / 2
            rows[i][0] = middle
            rows[i - 1][1] = middle
    if len(rows) >= 2:  # turns under MIN_TURN_S go to the nearer neighbour
        for i in range(len(rows)):
            rows[i][0] = round(rows[i][0], 2)
            rows[i][1] = round(rows[i][1], 2)
            if rows[i][1] - rows[i][0] < MIN_TURN_S:
                if i == 0:
                    rows[i][2] = rows[i + 1][2]
                elif i == len(rows) - 1:
                    rows[i][2] = rows[i - 1][2]
                elif rows[i][0] - rows[i - 1][1] <= rows[i + 1][0] - rows[i][1]:
                    rows[i][2] = rows[i - 1][2]
                else:
                    rows[i][2] = rows[i + 1][2]
        rows = _merge(rows)
    return [Turn(start=s, end=e, speaker=spk) for s, e, spk in rows]


def _merge(rows: list[list]) -> list[list]:
    out = [rows[0]]
    for row in rows[1:]:
        if row[2] != out[-1][2] or row[0] > out[-1][1]:
            out.append(row)
        else:
            out[-1][1] = row[1]
    return out


def speaker_of(start: float, end: float, turns: Sequence[Turn]) -> int:
    """The official distribute_spk for one stretch (seconds): the speaker with the most overlap (0 if none)."""
    start_ms, end_ms = start * 1000, end * 1000
    speaker, best = 0, 0.0
    for t in turns:
        overlap = max(min(end_ms, t.end * 1000) - max(start_ms, t.start * 1000), 0)
        if overlap > best:
            best, speaker = overlap, t.speaker
        if overlap > 0 and speaker == t.speaker:
            best += overlap
    return int(speaker)


def diarize(samples: np.ndarray, spans: Sequence[tuple[float, float]],
            embed: Callable[[list[np.ndarray]], np.ndarray],
            cluster: Callable[..., np.ndarray], num_speakers: int | None = None) -> list[Turn]:
    """Speaker turns of 16 kHz `samples` over its speech `spans` (seconds): windows, `embed` (a list of windows ->
    [N, D] embeddings), `cluster(embeddings, num_speakers=...)` -> labels, then the official post-processing."""
    return diarize_spans(span_samples(spans, samples), embed, cluster, num_speakers)


EMBED_BATCH = 64  # windows embedded together (and at most this many held beyond their embeddings)


def diarize_spans(spans: Iterable[tuple[float, float, np.ndarray]],
                  embed: Callable[[list[np.ndarray]], np.ndarray],
                  cluster: Callable[..., np.ndarray], num_speakers: int | None = None,
                  on_span: Callable[[float], None] | None = None, batch: int = EMBED_BATCH) -> list[Turn]:
    """`diarize` over speech spans given as (start_s, end_s, their samples) in time order, e.g. cut from a file as
    it is read: windows are embedded `batch` at a time, so memory holds the embeddings (768 bytes a window,
    ~3.7 MB an hour of speech) and not the audio. `on_span(end_s)` after each span (progress, cancellation)."""
    times: list[tuple[float, float]] = []
    rows: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            rows.append(np.asarray(embed(pending), dtype=np.float32))
            pending.clear()

    for start, end, data in spans:
        for w_start, w_end, chunk in span_windows(start, end, data):
            times.append((w_start, w_end))
            pending.append(np.array(chunk, dtype=np.float32))  # a copy: a view would keep its whole span alive
            if len(pending) >= batch:
                flush()
        if on_span is not None:
            on_span(end)
    flush()
    if not times:
        return []
    labels = np.asarray(cluster(np.concatenate(rows), num_speakers=num_speakers))
    return turns_from_labels(times, labels.tolist())
