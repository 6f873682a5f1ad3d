"""asr.speaker.der against pyannote.metrics' DiarizationErrorRate on random turn sets (pyannote only here)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the DER's speaker mapping needs SciPy (the `speakers` extra)")

from asr.errors import InvalidOptionError  # noqa: E402
from asr.speaker.der import diarization_error_rate  # noqa: E402


def _random_turns(
    rs: np.random.RandomState, n_speakers: int, prefix: str, grid: float, duration: float = 60.0
):
    turns = []
    for spk in range(n_speakers):
        t = rs.uniform(0, 5)
        while t < duration:
            length = rs.exponential(4.0) + grid
            if grid:
                t, length = round(t / grid) * grid, max(round(length / grid), 1) * grid
            turns.append((t, t + length, f"{prefix}{spk}"))
            t += length + rs.exponential(6.0)
    return turns


def _hypothesis_from(rs: np.random.RandomState, ref, n_hyp: int, grid: float):
    """A plausible system output: jittered reference turns with mostly consistent relabelling, some noise turns."""
    labels = sorted({lab for _, _, lab in ref})
    relabel = {lab: f"h{rs.randint(n_hyp)}" for lab in labels}
    hyp = []
    for s, e, lab in ref:
        if rs.rand() < 0.1:
            continue  # missed turn
        js, je = rs.normal(0, 0.3, 2)
        s2, e2 = max(0.0, s + js), e + je
        if grid:
            s2, e2 = round(s2 / grid) * grid, round(e2 / grid) * grid
        if e2 > s2:
            hyp.append((s2, e2, relabel[lab] if rs.rand() < 0.85 else f"h{rs.randint(n_hyp)}"))
    for _ in range(rs.randint(0, 4)):
        s = rs.uniform(0, 60)
        hyp.append((s, s + rs.exponential(2.0) + 0.1, f"h{rs.randint(n_hyp)}"))
    return hyp


def _pyannote_der(ref, hyp, collar, skip_overlap):
    core = pytest.importorskip("pyannote.core", reason="pyannote.metrics is only a test-time reference")
    metrics = pytest.importorskip("pyannote.metrics.diarization")
    R, H = core.Annotation(), core.Annotation()
    for s, e, lab in ref:
        R[core.Segment(s, e), R.new_track(core.Segment(s, e))] = lab
    for s, e, lab in hyp:
        H[core.Segment(s, e), H.new_track(core.Segment(s, e))] = lab
    metric = metrics.DiarizationErrorRate(collar=collar, skip_overlap=skip_overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'uem' was approximated by the union of ... extents"
        detail = metric(R, H, detailed=True)
    return detail


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("collar", "skip_overlap"), [(0.0, False), (0.5, False), (0.25, True)])
def test_der_matches_pyannote(seed, collar, skip_overlap):
    rs = np.random.RandomState(seed)
    grid = 0.01 if seed % 2 else 0.0  # shared boundaries (ties) on half the cases
    ref = _random_turns(rs, rs.randint(1, 5), "r", grid)
    hyp = _hypothesis_from(rs, ref, rs.randint(1, 6), grid)
    ours = diarization_error_rate(ref, hyp, collar=collar, skip_overlap=skip_overlap)
    theirs = _pyannote_der(ref, hyp, collar, skip_overlap)
    assert ours.der == pytest.approx(theirs["diarization error rate"], rel=1e-9, abs=1e-12)
    assert ours.total == pytest.approx(theirs["total"], rel=1e-9)
    assert ours.missed == pytest.approx(theirs["missed detection"], rel=1e-9, abs=1e-9)
    assert ours.false_alarm == pytest.approx(theirs["false alarm"], rel=1e-9, abs=1e-9)
    assert ours.confusion == pytest.approx(theirs["confusion"], rel=1e-9, abs=1e-9)


def test_der_hand_computed():
    ref = [(0, 10, "A"), (10, 20, "B"), (15, 20, "A")]  # 5 s of overlap: total 25 s
    hyp = [(0, 11, "x"), (11, 20, "y")]
    res = diarization_error_rate(ref, hyp)
    assert res.mapping == {"x": "A", "y": "B"}
    assert res.total == 25
    assert res.missed == 5  # one voice of the overlap
    assert res.false_alarm == 0
    assert res.confusion == 1  # [10, 11): B labelled x (= A)
    assert res.der == pytest.approx(6 / 25)
    # a 2 s collar (1 s each side) around 0, 10, 15, 20 and 20: [1, 9) + [11, 14) + [16, 19) are left
    res = diarization_error_rate(ref, hyp, collar=2.0)
    assert res.total == pytest.approx(8 + 3 + 2 * 3)
    assert res.der == pytest.approx(3 / 17)
    assert diarization_error_rate(ref, hyp, skip_overlap=True).der == pytest.approx(1 / 15)  # [0, 15) left
    perfect = diarization_error_rate(ref, [(s, e, f"s{lab}") for s, e, lab in ref])
    assert perfect.der == 0 and perfect.correct == 25


def test_der_rejects_bad_turns():
    with pytest.raises(InvalidOptionError):
        diarization_error_rate([(2, 1, "A")], [])
    with pytest.raises(InvalidOptionError):
        diarization_error_rate([(0, 1)], [])
    with pytest.raises(InvalidOptionError):
        diarization_error_rate([(0, 1, "A")], [], collar=-1)
