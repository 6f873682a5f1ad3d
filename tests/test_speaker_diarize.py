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


# ---- speakers through transcribe(): real clips of different speakers joined into conversations -----------------
AUDIO = REPO / "tests" / "data" / "audio"
TONES = (6000.0, 6500.0, 7000.0, 7500.0)  # a faint high tone under each speaker's clips, which the test runner recognises


class ToneRunner:
    """A speaker runner (the interface CAM++ implements) that knows each clip's speaker by the faint tone mixed
    under it: the embedding of a window is its tone's identity, plus a little noise. Random weights cannot tell
    voices apart; this tests everything around the embeddings."""

    def __init__(self):
        self.calls = 0
        self.rng = np.random.default_rng(0)

    def embed_windows(self, wins):
        self.calls += 1
        t = np.arange(len(wins[0])) / 16000
        basis = np.exp(-2j * np.pi * np.outer(TONES, t))  # [tones, samples]
        power = np.abs(np.stack(wins) @ basis.T)  # [windows, tones]
        out = np.eye(len(TONES))[np.argmax(power, axis=1)] + 0.05 * self.rng.standard_normal((len(wins), len(TONES)))
        return out.astype(np.float32)


def conversation(parts: list[tuple[str, int, float]]) -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    """Clips joined in order, each (path, speaker, pause after in s); returns the samples and the true turns."""
    import soundfile as sf

    chunks, truth, t = [], [], 0.0
    for path, spk, pause in parts:
        x, sr = sf.read(AUDIO / path, dtype="float32")
        assert sr == 16000
        tone = 0.02 * np.sin(2 * np.pi * TONES[spk] * np.arange(len(x)) / 16000).astype(np.float32)
        chunks += [x + tone, np.zeros(int(pause * 16000), np.float32)]
        truth.append((t, t + len(x) / 16000, spk))
        t += len(x) / 16000 + pause
    return np.concatenate(chunks), truth


CONVERSATIONS = {
    "two, with pauses": [("en/jfk.wav", 0, 1.0), ("zh/example_zh.wav", 1, 1.0), ("en/jfk.wav", 0, 1.0),
                         ("zh/aishell1_BAC009S0724W0121.wav", 1, 0.0)],
    "three, no pause at two changes": [("en/jfk.wav", 0, 0.0), ("de/fleurs_de_de_test_004.wav", 2, 1.2),
                                       ("zh/example_zh.wav", 1, 0.0), ("en/example_en.wav", 0, 1.0),
                                       ("de/fleurs_de_de_test_004.wav", 2, 0.0)],
    "four": [("en/jfk.wav", 0, 0.8), ("zh/example_zh.wav", 1, 0.8), ("de/fleurs_de_de_test_004.wav", 2, 0.8),
             ("fr/fleurs_fr_fr_test_005.wav", 3, 0.8), ("en/example_en.wav", 0, 0.0)],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_speaker_turns_reach_the_transcript(tiny_checkpoint, name):
    import asr
    from asr.speaker.der import diarization_error_rate

    parts = CONVERSATIONS[name]
    samples, truth = conversation(parts)
    runner = ToneRunner()
    model = asr.load_model(str(tiny_checkpoint), dtype="float32", speaker_model=runner)
    r = model.transcribe(samples, speakers="auto", max_new_tokens=4)
    assert runner.calls >= 1 and r.timings.speakers_s > 0
    segs = [s for s in r.segments]
    assert segs and all(s.speaker for s in segs)
    # one label per true speaker, consistently: map labels to true speakers by overlap
    def true_speaker(a, b):
        overlaps = [(max(0.0, min(b, e) - max(a, s)), k) for s, e, k in truth]
        return max(overlaps)[1], sorted(o for o, _ in overlaps)[-2] if len(overlaps) > 1 else 0.0

    mapping: dict[str, int] = {}
    for s in segs:
        spk, second = true_speaker(s.start, s.end)
        assert mapping.setdefault(s.speaker, spk) == spk, (s, mapping)
        assert second < 0.5, f"segment {s.start}-{s.end} straddles a turn by {second:.2f} s"
    assert len(mapping) == len({k for *_, k in truth}) == len(set(mapping.values()))
    hyp = [(s.start, s.end, s.speaker) for s in segs]
    der = diarization_error_rate([(a, b, k) for a, b, k in truth], hyp, collar=0.5)
    print(f"{name}: DER {der.der:.3f} (missed {der.missed:.2f} s, false alarm {der.false_alarm:.2f} s, "
          f"confusion {der.confusion:.2f} s of {der.total:.1f} s)")
    assert der.confusion < 0.5 and der.der < 0.15
    # the writers show the speakers
    from asr.writers import render

    assert render(r, "txt").startswith(f"{segs[0].speaker}: ")
    assert f"<v {segs[0].speaker}>" in render(r, "vtt") and f"\n{segs[0].speaker}: " in render(r, "srt")
    n = len({k for *_, k in truth})
    fixed = model.transcribe(samples, speakers=n, max_new_tokens=4)
    assert {s.speaker for s in fixed.segments} == set(mapping)


def test_speakers_on_a_long_streamed_file(tiny_checkpoint, tmp_path):
    """A file over STREAM_ABOVE_S is streamed (never decoded into memory whole): the speaker windows come from one
    more pass over its blocks, and the result equals the same samples transcribed in memory."""
    import soundfile as sf

    import asr
    from asr.audio.io import STREAM_ABOVE_S

    one, truth1 = conversation(CONVERSATIONS["two, with pauses"])
    reps = int(STREAM_ABOVE_S // (len(one) / 16000)) + 1
    samples = np.concatenate([one] * reps)
    period = len(one) / 16000
    truth = [(a + i * period, b + i * period, k) for i in range(reps) for a, b, k in truth1]
    path = tmp_path / "meeting.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")  # the same samples as in memory
    runner = ToneRunner()
    model = asr.load_model(str(tiny_checkpoint), dtype="float32", speaker_model=runner)
    seen = []
    streamed = model.transcribe(str(path), speakers="auto", max_new_tokens=2,
                                progress=lambda done, total, msg: seen.append(msg))
    assert streamed.timings.audio_duration_s > STREAM_ABOVE_S
    assert any(m.startswith("finding speakers") for m in seen)
    assert runner.calls > 1  # windows embedded in batches as the file is read
    in_memory = model.transcribe(samples, speakers="auto", max_new_tokens=2, vad=True)
    key = lambda r: [(s.start, s.end, s.speaker) for s in r.segments]  # noqa: E731
    assert key(streamed) == key(in_memory) and len({s.speaker for s in streamed.segments}) == 2
    from asr.speaker.der import diarization_error_rate

    der = diarization_error_rate(truth, [(s.start, s.end, s.speaker) for s in streamed.segments], collar=0.5)
    assert der.confusion < 0.5 * reps and der.der < 0.15, der


def test_streamed_spans_equal_the_in_memory_cut(tmp_path):
    """asr.pipeline._stream_spans (one block pass over a file) yields exactly the samples that slicing the decoded
    array gives, also across block boundaries and for overlapping spans; refuses spans out of order; stops on
    cancel."""
    import threading

    import soundfile as sf

    from asr.audio.io import AudioFile
    from asr.errors import TranscriptionCancelled
    from asr.pipeline import BLOCK_S, _stream_spans
    from asr.speaker.diarize import sample_index, span_samples

    x = np.random.default_rng(0).uniform(-0.5, 0.5, int(16000 * (2.5 * BLOCK_S))).astype(np.float32)
    path = tmp_path / "x.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    n = len(x) / 16000
    spans = [(0.0, 1.3), (1.2, BLOCK_S - 0.1), (BLOCK_S - 0.1, BLOCK_S + 3.3), (BLOCK_S + 3.0, n - 2.0),
             (n - 1.0, n)]
    with AudioFile.open(path) as f:
        got = list(_stream_spans(f, spans, sample_index))
    want = list(span_samples(spans, x))
    assert [(a, b) for a, b, _ in got] == spans
    assert all(np.array_equal(g[2], w[2]) for g, w in zip(got, want, strict=True))
    with AudioFile.open(path) as f, pytest.raises(ValueError, match="start in time order"):
        list(_stream_spans(f, [(5.0, 6.0), (1.0, 2.0)], sample_index))
    cancel = threading.Event()
    cancel.set()
    with AudioFile.open(path) as f, pytest.raises(TranscriptionCancelled):
        list(_stream_spans(f, spans, sample_index, cancel))


def test_cancel_while_finding_speakers(tiny_checkpoint):
    """A cancel set while the speaker windows are embedded ends the call with TranscriptionCancelled, before any
    segment is decoded."""
    import threading

    import asr
    from asr.errors import TranscriptionCancelled

    samples, _truth = conversation(CONVERSATIONS["two, with pauses"])
    model = asr.load_model(str(tiny_checkpoint), dtype="float32", speaker_model=ToneRunner())
    cancel, decoded = threading.Event(), []

    def progress(done, total, msg):
        if msg.startswith("finding speakers"):
            cancel.set()

    with pytest.raises(TranscriptionCancelled):
        model.transcribe(samples, speakers="auto", max_new_tokens=2, progress=progress, cancel=cancel,
                         on_segment=decoded.append)
    assert cancel.is_set() and decoded == []


def test_speakers_need_a_speaker_model_and_a_valid_count(tiny_model):
    from asr.errors import InvalidOptionError

    samples = np.zeros(16000, np.float32) + 0.01
    with pytest.raises(InvalidOptionError, match="speaker model"):
        tiny_model.transcribe(samples, speakers="auto")
    for bad in (0, 16, "two", True, 1.5):
        with pytest.raises(InvalidOptionError, match="speakers must be"):
            tiny_model.transcribe(samples, speakers=bad)


def test_speakers_through_the_mcp_tool_and_the_http_api(tiny_checkpoint, tmp_path):
    """transcribe_file(speakers='auto') and POST /v1/audio/transcriptions with speakers=auto carry the turns;
    servers without a speaker model say so."""
    import anyio
    import httpx2 as httpx
    import soundfile as sf
    from mcp import Client

    import asr
    from server.app import create_server
    from server.config import Settings
    from server.schemas import StatusOutput, TranscriptionOutput
    from tests.test_http import live
    from tests.test_server_support import fake_loader

    samples, truth = conversation(CONVERSATIONS["two, with pauses"])
    wav = tmp_path / "talk.wav"
    sf.write(wav, samples, 16000)
    settings = Settings(allowed_roots=(str(tmp_path),), warmup=False, max_new_tokens=4)
    loader = lambda: asr.load_model(str(tiny_checkpoint), dtype="float32", speaker_model=ToneRunner())  # noqa: E731

    async def mcp_calls():
        async with Client(create_server(settings, model_loader=loader)) as client:
            r = await client.call_tool("transcribe_file", {"path": str(wav), "speakers": "auto",
                                                           "include_segments": True})
            status = await client.call_tool("server_status", {})
            return r, status

    r, status = anyio.run(mcp_calls)
    out = TranscriptionOutput.model_validate(r.structured_content)
    assert not r.is_error and {s.speaker for s in out.segments} == {"S1", "S2"}
    assert out.text.splitlines()[0].startswith("S1: ") and any(ln.startswith("S2: ") for ln in out.text.splitlines())
    assert StatusOutput.model_validate(status.structured_content).model.speaker_model == "ToneRunner"

    async def without():
        load, _ = fake_loader()
        async with Client(create_server(settings, model_loader=load)) as client:
            await client.call_tool("list_languages", {})  # waits for the load
            return await client.call_tool("transcribe_file", {"path": str(wav), "speakers": 2})

    refused = anyio.run(without)
    assert refused.is_error and "no speaker model" in refused.content[0].text

    with live(settings, loader=loader) as (base, _app):
        v = httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("talk.wav", wav.read_bytes())},
                       data={"response_format": "verbose_json", "speakers": "auto"}, timeout=120).json()
        assert {s["speaker"] for s in v["segments"]} == {"S1", "S2"} and v["text"].startswith("S1: ")
        bad = httpx.post(f"{base}/v1/audio/transcriptions", files={"file": ("talk.wav", wav.read_bytes())},
                         data={"speakers": "many"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "speakers"


def test_cli_speakers(tiny_checkpoint, tmp_path):
    """funasr-nano transcribe --speakers with a (tiny, random) CAM++ folder: every line has a speaker."""
    import os
    import sys

    from tools.speaker_checkpoint import write_checkpoint

    campplus = write_checkpoint(tmp_path / "campplus", size="tiny", seed=0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "asr.cli", "transcribe", str(AUDIO / "en" / "jfk.wav"), "--model",
            str(tiny_checkpoint), "--max-new-tokens", "4"]
    r = subprocess.run(base + ["--speakers", "auto", "--speaker-model", str(campplus)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and all(line.startswith("S") and ": " in line for line in r.stdout.strip().splitlines())
    r = subprocess.run(base + ["--speakers", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--speaker-model" in r.stderr
    r = subprocess.run(base + ["--speakers", "lots"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "number of speakers" in r.stderr
