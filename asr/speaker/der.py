"""Diarization error rate (DER), with the definitions of pyannote.metrics' `DiarizationErrorRate`.

    result = diarization_error_rate(reference, hypothesis, collar=0.5)
    result.der, result.missed, result.false_alarm, result.confusion, result.total, result.mapping

``reference`` and ``hypothesis`` are iterables of turns ``(start, end, label)`` in seconds; labels are any
hashable values, and the two label sets need not share names (a hypothesis label only ever matches the reference
label it is mapped to).

    DER = (missed + false_alarm + confusion) / total

* total: reference speech, counted once per speaker talking (overlapped speech counts twice);
* on each stretch of time with ``R`` reference and ``H`` hypothesis speakers, of which ``C`` are the same after the
  mapping: missed ``max(0, R - H)``, false alarm ``max(0, H - R)``, confusion ``min(R, H) - C``, times the length;
* the mapping from hypothesis to reference labels is one to one and maximises the total time they share (the
  Hungarian algorithm: scipy's `linear_sum_assignment`); labels that share no time stay unmapped;
* ``uem``: the evaluated stretches (default: from the first to the last turn of either side, gaps included);
* ``collar``: the *total* width of the zone removed around every reference turn's start and end, half on each
  side (pyannote's convention; NIST md-eval's "0.25 s collar" is 0.25 s per side, i.e. ``collar=0.5``);
* ``skip_overlap``: leave out the stretches where the reference has overlapping turns.

As in pyannote.metrics, two overlapping turns of the same label count as two voices; merge them first where that is
not meant. pyannote.metrics itself is not a dependency: it pulls pandas, scikit-learn and pyannote.database for this
one formula. tests/test_speaker_der.py checks this module against it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidOptionError

__all__ = ["DERResult", "diarization_error_rate"]

Turn = tuple[float, float, Hashable]


@dataclass(frozen=True)
class DERResult:
    der: float
    missed: float  # seconds (speaker-weighted)
    false_alarm: float
    confusion: float
    total: float  # reference speech, speaker-weighted, within the evaluated zone
    correct: float
    mapping: dict = field(default_factory=dict)  # hypothesis label -> reference label


def diarization_error_rate(
    reference: Iterable[Turn],
    hypothesis: Iterable[Turn],
    *,
    collar: float = 0.0,
    skip_overlap: bool = False,
    uem: Sequence[tuple[float, float]] | None = None,
) -> DERResult:
    ref = _turns(reference, "reference")
    hyp = _turns(hypothesis, "hypothesis")
    if collar < 0:
        raise InvalidOptionError(f"collar must be >= 0 seconds, got {collar!r}")

    if uem is None:
        ends = [t for s, e, _ in ref + hyp for t in (s, e)]
        zone = [(min(ends), max(ends))] if ends else []
    else:
        zone = _union([(float(s), float(e)) for s, e in uem if e > s])
    removed = []
    if collar > 0:
        for s, e, _ in ref:
            removed += [(s - collar / 2, s + collar / 2), (e - collar / 2, e + collar / 2)]
    if skip_overlap:
        removed += _overlaps(ref)
    zone = _subtract(zone, _union(removed))

    ref = _crop(ref, zone)
    hyp = _crop(hyp, zone)
    if not ref and not hyp:
        return DERResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {})

    bounds = np.unique(np.array([t for s, e, _ in ref + hyp for t in (s, e)], dtype=np.float64))
    dur = np.diff(bounds)
    r_labels, R = _counts(ref, bounds)
    h_labels, H = _counts(hyp, bounds)

    # time shared by each (hypothesis, reference) pair, then the one-to-one mapping that maximises it
    cooc = (H * dur[:, None]).T @ R  # [n_hyp, n_ref]
    mapping: dict = {}
    mapped = np.full(len(h_labels), -1)
    if cooc.size:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as e:
            raise InvalidOptionError(
                f"the DER's speaker mapping needs SciPy: pip install 'funasr-nano-mlx[speakers]' ({e})"
            ) from e
        for h, r in zip(*linear_sum_assignment(-cooc), strict=True):
            if cooc[h, r] > 0:
                mapping[h_labels[h]] = r_labels[r]
                mapped[h] = r

    n_ref = R.sum(axis=1)
    n_hyp = H.sum(axis=1)
    correct = np.zeros(len(dur))
    for h, r in enumerate(mapped):
        if r >= 0:
            correct += np.minimum(H[:, h], R[:, r])
    total = float(np.sum(dur * n_ref))
    miss = float(np.sum(dur * np.maximum(0, n_ref - n_hyp)))
    fa = float(np.sum(dur * np.maximum(0, n_hyp - n_ref)))
    conf = float(np.sum(dur * (np.minimum(n_ref, n_hyp) - correct)))
    good = float(np.sum(dur * correct))
    errors = miss + fa + conf
    der = errors / total if total > 0 else (0.0 if errors == 0 else 1.0)  # pyannote's convention
    return DERResult(der, miss, fa, conf, total, good, mapping)


def _turns(turns: Iterable[Turn], what: str) -> list[tuple[float, float, Hashable]]:
    out = []
    for turn in turns:
        try:
            s, e, label = turn
            s, e = float(s), float(e)
        except (TypeError, ValueError) as err:
            raise InvalidOptionError(f"{what} turns must be (start, end, label), got {turn!r}") from err
        if not (np.isfinite(s) and np.isfinite(e)):
            raise InvalidOptionError(f"{what} turn {turn!r} has a non-finite time")
        if e < s:
            raise InvalidOptionError(f"{what} turn {turn!r} ends before it starts")
        if e > s:
            out.append((s, e, label))
    return out


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _subtract(zone: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for s, e in zone:
        cur = s
        for hs, he in holes:
            if he <= cur or hs >= e:
                continue
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
        if cur < e:
            out.append((cur, e))
    return out


def _overlaps(turns: list[tuple[float, float, Hashable]]) -> list[tuple[float, float]]:
    out = []
    for i, (s1, e1, _) in enumerate(turns):
        for s2, e2, _ in turns[i + 1 :]:
            s, e = max(s1, s2), min(e1, e2)
            if e > s:
                out.append((s, e))
    return out


def _crop(turns, zone):
    out = []
    for s, e, label in turns:
        for zs, ze in zone:
            cs, ce = max(s, zs), min(e, ze)
            if ce > cs:
                out.append((cs, ce, label))
    return out


def _counts(turns, bounds: np.ndarray) -> tuple[list, np.ndarray]:
    """Per elementary stretch [bounds[i], bounds[i+1]): how many turns of each label cover it."""
    labels = list(dict.fromkeys(label for _, _, label in turns))
    index = {label: i for i, label in enumerate(labels)}
    delta = np.zeros((len(bounds), len(labels)), dtype=np.int64)
    for s, e, label in turns:
        j = index[label]
        delta[np.searchsorted(bounds, s), j] += 1
        delta[np.searchsorted(bounds, e), j] -= 1
    return labels, np.cumsum(delta, axis=0)[:-1]
