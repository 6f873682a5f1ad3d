"""asr.speaker.diarize: the official windowing (sv_chunk), post-processing (postprocess: correct_labels, merge_seque,
overlap split, smooth) and sentence assignment (distribute_spk), checked equal to funasr 1.4.16's own functions run
in the reference venv on random inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from asr.speaker.diarize import Turn, speaker_of, turns_from_labels, windows

REPO = Path(__file__).resolve().parents[1]
REF_PYTHON = REPO / ".venv-ref" / "bin" / "python"

OFFICIAL = r"""
import json, sys
import numpy as np
from funasr.models.campplus.utils import sv_chunk, postprocess, distribute_spk
cases = json.load(open(sys.argv[1]))
out = []
for c in cases:
    rng = np.random.default_rng(c["seed"])
    audio = rng.standard_normal(c["n"]).astype(np.float32)
    vad = [[s, e, audio[int(round(s * 16000)): int(round(e * 16000))]] for s, e in c["spans"]]
    chunks = sv_chunk(vad)
    res = {"windows": [[a, b, float(np.abs(x).sum())] for a, b, x in chunks]}
    labels = np.array(c["labels"][: len(chunks)])
    if len(labels) == len(chunks) and len(chunks):
        turns = postprocess([[a, b] for a, b, _ in chunks], None, labels, np.zeros((len(chunks), 2)))
        res["turns"] = [[float(a), float(b), int(k)] for a, b, k in turns]
        sentences = [{"start": s * 1000, "end": e * 1000} for s, e in c["sentences"]]
        res["spk"] = [d["spk"] for d in distribute_spk(sentences, turns)]
    out.append(res)
json.dump(out, open(sys.argv[2], "w"))
"""


def _cases(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = []
    for seed in range(n):
        duration = float(rng.uniform(3, 90))
        spans, t = [], float(rng.uniform(0, 2))
        while t < duration - 0.3:  # speech of 0.2-4 s (short ones make short turns), pauses of 0-2 s
            length = float(rng.uniform(0.2, 4.0))
            spans.append((round(t, 3), round(min(t + length, duration), 3)))
            t += length + float(rng.uniform(0.0, 2.0))
        # labels in runs (speakers keep the floor for a while), often flipping for a window or two
        labels, current = [], int(rng.integers(0, 4))
        for _ in range(800):
            if rng.random() < 0.3:
                current = int(rng.integers(0, 4))
            labels.append(current)
        sentences = [(float(a), float(a + rng.uniform(0.2, 6))) for a in rng.uniform(0, duration, size=6)]
        cases.append({"seed": seed, "n": int(duration * 16000) + 1, "spans": spans, "labels": labels,
                      "sentences": sentences})
    return cases


@pytest.mark.skipif(not REF_PYTHON.exists(), reason="the reference venv (.venv-ref, tools/test.sh builds it) is absent")
def test_windows_turns_and_assignment_equal_the_official_functions(tmp_path):
    cases = _cases()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "official.py").write_text(OFFICIAL)
    subprocess.run([str(REF_PYTHON), str(tmp_path / "official.py"), str(tmp_path / "cases.json"),
                    str(tmp_path / "out.json")], check=True, capture_output=True, timeout=300)
    official = json.loads((tmp_path / "out.json").read_text())
    compared_turns = 0
    for case, want in zip(cases, official, strict=True):
        audio = np.random.default_rng(case["seed"]).standard_normal(case["n"]).astype(np.float32)
        got = windows(case["spans"], audio)
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want["windows"]]
        assert np.allclose([float(np.abs(x).sum()) for *_, x in got], [s for *_, s in want["windows"]], rtol=1e-6)
        if "turns" in want:
            turns = turns_from_labels([(a, b) for a, b, _ in got], case["labels"][: len(got)])
            assert [[t.start, t.end, t.speaker] for t in turns] == want["turns"]
            assert [speaker_of(s, e, turns) for s, e in case["sentences"]] == want["spk"]
            compared_turns += 1
    assert compared_turns >= 30


def test_turns_of_a_plain_conversation():
    # three windows of speaker 7, then four of speaker 3: renumbered by appearance, overlaps split at the middle
    times = [(0.0, 1.5), (0.75, 2.25), (1.5, 3.0), (2.25, 3.75), (3.0, 4.5), (3.75, 5.25), (4.5, 6.0)]
    turns = turns_from_labels(times, [7, 7, 7, 3, 3, 3, 3])
    assert turns == [Turn(0.0, 2.62, 0), Turn(2.62, 6.0, 1)]
    assert speaker_of(0.1, 2.0, turns) == 0 and speaker_of(3.0, 5.9, turns) == 1
    assert turns_from_labels([], []) == []
    with pytest.raises(ValueError):
        turns_from_labels(times, [1])
