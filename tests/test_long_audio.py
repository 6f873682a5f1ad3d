"""Long audio end to end on the tiny random model: ~10 minutes of real clips joined by silences of known
length, through `FunASRNano.transcribe` (block streaming, > STREAM_ABOVE_S) and through the MCP server.

Ground truth: each clip's speech extent from its own energy (first/last 20 ms frame above 5 % of the clip's
peak RMS, as tests/test_vad.py), shifted by where the clip was placed. Only clean recordings are used (in
jfk.wav and most FLEURS clips background noise would count as speech for an energy measure).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asr
import asr.audio
from asr.audio.io import STREAM_ABOVE_S, AudioFile
from asr.audio.vad import plan_segments
from tests.conftest import AUDIO

SR = 16000
FRAME = 320  # 20 ms energy frames
QUIET = 0.05  # a frame below this fraction of its clip's peak RMS holds no speech
TOL = 0.3  # allowed error of a segment edge, in seconds
PAD = plan_segments.__kwdefaults__["pad_s"]  # segments are padded into the silence by this much per side
MAX_SEGMENT_S = 30.0
MAX_NEW_TOKENS = 4

# (clip, seconds of silence before it); the file ends with TAIL_S of silence
LAYOUT = [
    ("zh/example_zh.wav", 1.5),
    ("en/example_en.wav", 2.0),
    ("long/voxpopuli_en_test_000.wav", 3.0),  # 69 s of speech: split into pieces of <= 30 s
    ("ja/example_ja.wav", 1.6),
    ("en/librispeech_1995-1837-0001.wav", 2.5),
    ("es/fleurs_es_419_test_002.wav", 150.0),
    ("zh/aishell1_BAC009S0724W0121.wav", 1.8),
    ("en/ljspeech_LJ050-0131.wav", 2.2),
    ("zh/funasr_asr_example_zh.wav", 120.0),
    ("zh/funasr_llamacpp_sample.wav", 4.0),  # a pause inside: may come out as two pieces
]
TAIL_S = 185.0


@dataclass
class Clip:
    name: str
    start: float  # where the clip sits in the long file
    end: float
    speech_start: float  # its speech extent (energy), in the long file
    speech_end: float
    rms: np.ndarray  # 20 ms frame RMS of the clip
    peak: float

    def loudest_between(self, t0: float, t1: float) -> float:
        """Loudest 20 ms frame of the clip overlapping [t0, t1] (at least the frame at t0), / its peak."""
        i0 = max(0, int((t0 - self.start) * SR) // FRAME)
        i1 = max(i0 + 1, -(-int((t1 - self.start) * SR) // FRAME))
        return float(self.rms[i0:i1].max() / self.peak)


@dataclass
class LongFile:
    path: Path
    samples: np.ndarray
    clips: list[Clip]

    @property
    def duration(self) -> float:
        return len(self.samples) / SR


def frame_rms(x: np.ndarray) -> np.ndarray:
    n = len(x) // FRAME
    return np.sqrt((x[: n * FRAME].reshape(n, FRAME) ** 2).mean(1))


@pytest.fixture(scope="module")
def long_file(testdata, tmp_path_factory) -> LongFile:
    parts, clips, t = [], [], 0.0
    for name, gap in LAYOUT:
        x, sr = sf.read(AUDIO / name, dtype="float32")
        assert sr == SR and x.ndim == 1, name
        parts += [np.zeros(round(gap * SR), np.float32), x]
        t += gap
        rms = frame_rms(x)
        on = np.flatnonzero(rms > QUIET * rms.max())
        clips.append(Clip(name, t, t + len(x) / SR, t + on[0] * FRAME / SR, t + (on[-1] + 1) * FRAME / SR,
                          rms, float(rms.max())))
        t += len(x) / SR
    parts.append(np.zeros(round(TAIL_S * SR), np.float32))
    samples = np.concatenate(parts)
    path = tmp_path_factory.mktemp("long") / "ten_minutes.wav"
    sf.write(path, samples, SR, subtype="FLOAT")  # float WAV: the file decodes to exactly these samples
    return LongFile(path, samples, clips)


class CountingFile(AudioFile):
    """An opened file that counts the passes reading it (each pass takes a reader of its own)."""

    readers = 0

    def reader(self):
        self.readers += 1
        return super().reader()


@pytest.fixture(scope="module")
def streamed(tiny_model, long_file):
    """The file, opened once: > STREAM_ABOVE_S, so read in blocks twice (VAD pass, decode pass), never loaded whole."""
    with CountingFile.open(long_file.path) as file:
        result = tiny_model.transcribe(file, max_new_tokens=MAX_NEW_TOKENS)
        return result, file.readers


@pytest.fixture(scope="module")
def in_memory(tiny_model, long_file):
    return tiny_model.transcribe(long_file.samples, max_new_tokens=MAX_NEW_TOKENS)


def touching(segments, t0: float, t1: float):
    return [s for s in segments if s.end > t0 and s.start < t1]


def test_the_file_is_streamed_in_blocks(long_file, streamed, tiny_model):
    result, readers = streamed
    assert long_file.duration > STREAM_ABOVE_S
    assert readers == 3  # the header, the VAD pass, the decode pass (loaded whole it would be 2)
    with CountingFile.open(long_file.path) as file:
        tiny_model.transcribe(file, max_new_tokens=1, vad=False)  # no VAD: one pass over everything, in memory
        assert file.readers == 1
    assert result.timings.audio_duration_s == pytest.approx(long_file.duration, abs=1e-3)


def test_segments_are_well_formed(long_file, streamed):
    result, _ = streamed
    segs = result.segments
    assert segs and result.finish_reason in ("stop", "length", "repetition")
    assert all(0.0 <= s.start < s.end <= long_file.duration + 1e-6 for s in segs)
    assert all(a.end <= b.start for a, b in pairwise(segs))  # sorted, non-overlapping
    assert result.text == " ".join(t for t in (s.text.strip() for s in segs) if t)
    assert result.token_ids == [tok for s in segs for tok in s.token_ids]
    assert all(0 < len(s.token_ids) <= MAX_NEW_TOKENS for s in segs)


def check_against_truth(segs, clips: list[Clip], max_segment_s: float) -> list[int]:
    """Assert the segments match the known speech; return the clips' piece counts."""
    assert all(s.end - s.start <= max_segment_s + 1e-6 for s in segs)
    for seg in segs:  # nothing in the known silences: every segment holds the speech of exactly one clip
        owners = [c.name for c in clips if seg.end > c.speech_start and seg.start < c.speech_end]
        assert len(owners) == 1, (seg.start, seg.end, owners)
    counts = []
    for clip in clips:
        pieces = touching(segs, clip.speech_start, clip.speech_end)
        assert pieces, clip.name
        # the outer edges: the clip's speech, padded by PAD into the silence around it, within TOL
        assert abs(pieces[0].start - (clip.speech_start - PAD)) <= TOL, (clip.name, pieces[0].start, clip.speech_start)
        assert abs(pieces[-1].end - (clip.speech_end + PAD)) <= TOL, (clip.name, pieces[-1].end, clip.speech_end)
        # one segment, or a clean split: consecutive pieces whose cut (or the gap between them) is quiet
        for a, b in pairwise(pieces):
            assert a.end <= b.start and clip.loudest_between(a.end, b.start) < QUIET, (clip.name, a.end, b.start)
        counts.append(len(pieces))
    return counts


def test_segments_match_the_known_speech(long_file, streamed):
    counts = check_against_truth(streamed[0].segments, long_file.clips, MAX_SEGMENT_S)
    names = [c.name for c in long_file.clips]
    assert counts[names.index("long/voxpopuli_en_test_000.wav")] >= 3  # 69 s of speech, <= 30 s per segment
    assert counts.count(1) >= 8  # the short clips land whole in one segment each


def test_long_speech_is_cut_at_quiet_points(tiny_model, long_file):
    """With 12 s segments the 69 s clip is also cut inside continuous speech (touching pieces)."""
    r = tiny_model.transcribe(long_file.samples, max_new_tokens=1, max_segment_s=12.0)
    check_against_truth(r.segments, long_file.clips, 12.0)
    assert any(a.end == b.start for a, b in pairwise(r.segments))


def test_streamed_equals_in_memory(streamed, in_memory):
    result = streamed[0]
    key = [(s.start, s.end, s.token_ids, s.text) for s in result.segments]
    assert key == [(s.start, s.end, s.token_ids, s.text) for s in in_memory.segments]
    assert result.token_ids == in_memory.token_ids and result.text == in_memory.text


@pytest.fixture(scope="module")
def long_silence(tmp_path_factory) -> Path:
    """11 minutes of digital silence (streamed by the model: no samples are ever loaded whole)."""
    path = tmp_path_factory.mktemp("silence") / "silence.wav"
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, subtype="PCM_16") as f:
        for _ in range(round(STREAM_ABOVE_S / 60) + 1):
            f.write(np.zeros(60 * SR, np.float32))
    return path


def test_a_long_silence_gives_no_text(tiny_model, long_silence):
    r = tiny_model.transcribe(str(long_silence), max_new_tokens=MAX_NEW_TOKENS)
    assert r.text == "" and r.segments == [] and r.token_ids == []
    assert r.finish_reason == "empty" and "no speech detected" in r.warnings


# --- through the MCP server (in-memory client, the real tiny model on the worker thread) ---------------------
class Recorder:
    """The real model, recording what the server handed to `transcribe` (the server caps max_new_tokens)."""

    def __init__(self, model):
        self.model = model
        self.inputs: list = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def transcribe(self, audio, **kwargs):
        self.inputs.append(audio)
        return self.model.transcribe(audio, **kwargs)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def mcp_server(tiny_checkpoint, roots: list[Path]):
    from server.app import create_server
    from server.config import Settings
    from server.intake import AudioAPI

    recorder: list[Recorder] = []
    loads: list[str] = []

    def loader():  # loads on the server's model thread, as in production
        recorder.append(Recorder(asr.load_model(str(tiny_checkpoint), dtype="float32")))
        return recorder[0]

    def load_audio(file, **k):
        loads.append(file.name)
        return asr.audio.load_audio(file, **k)

    settings = Settings(allowed_roots=roots, warmup=False, call_budget_s=300.0, max_new_tokens=MAX_NEW_TOKENS)
    server = create_server(settings, model_loader=loader, audio_api=AudioAPI(asr.audio.probe, load_audio))
    return server, recorder, loads


async def call(server, path: Path, *, again: dict | None = None, **args):
    """transcribe_file on `path`; with `again`, also get_transcript(job_id, **again) on the same job."""
    from mcp import Client

    from server.schemas import TranscriptionOutput

    results = []
    async with Client(server) as client:
        results.append(await client.call_tool("transcribe_file", {"path": str(path), **args}))
        if again is not None:
            job_id = results[0].structured_content["job_id"]
            results.append(await client.call_tool("get_transcript", {"job_id": job_id, **again}))
    out = []
    for result in results:
        text = "\n".join(c.text for c in result.content if c.type == "text")
        assert not result.is_error, text
        out += [TranscriptionOutput.model_validate(result.structured_content), text]
    return out


@pytest.mark.anyio
async def test_mcp_segments_of_the_voxpopuli_clip(tiny_checkpoint, tiny_model):
    clip = AUDIO / "long" / "voxpopuli_en_test_000.wav"
    server, recorder, loads = mcp_server(tiny_checkpoint, [clip.parent])
    out, text, plain, _ = await call(server, clip, include_segments=True, again={"include_segments": False})
    direct = tiny_model.transcribe(str(clip), max_new_tokens=MAX_NEW_TOKENS)
    assert out.status == "completed" and out.duration_s == pytest.approx(69.24, abs=0.01)
    assert [(s.start, s.end, s.text) for s in out.segments] == [(s.start, s.end, s.text) for s in direct.segments]
    assert len(out.segments) >= 3 and out.text == direct.text
    assert all(a.end <= b.start for a, b in pairwise(out.segments))
    assert "Segments:" in text and f"[{out.segments[0].start:.2f}-{out.segments[0].end:.2f}]" in text
    assert plain.segments is None and plain.text == out.text
    assert len(loads) == 1 and loads[0] == repr(str(clip))  # short: the server decodes it
    assert all(isinstance(x, asr.audio.Audio) for x in recorder[0].inputs)


@pytest.mark.anyio
async def test_mcp_streams_a_long_file(tiny_checkpoint, long_file, streamed):
    server, recorder, loads = mcp_server(tiny_checkpoint, [long_file.path.parent])
    out, _ = await call(server, long_file.path, include_segments=True)
    # the opened file, not the samples
    assert loads == [] and [x.path for x in recorder[0].inputs] == [str(long_file.path.resolve())]
    assert all(isinstance(x, AudioFile) and x.fd is None for x in recorder[0].inputs)  # closed with its job
    assert out.duration_s == pytest.approx(long_file.duration, abs=1e-3)
    expected = streamed[0]
    assert [(s.start, s.end, s.text) for s in out.segments] == [(s.start, s.end, s.text) for s in expected.segments]
    assert out.text == expected.text


@pytest.mark.anyio
async def test_mcp_long_silence_is_a_clear_empty_result(tiny_checkpoint, long_silence):
    """A short silent file is refused by the server's peak check; a long one is not loaded, so the model's VAD
    decides: a completed result with no text, no segments and the "no speech detected" warning."""
    server, recorder, loads = mcp_server(tiny_checkpoint, [long_silence.parent])
    out, text = await call(server, long_silence, include_segments=True)
    assert loads == [] and [x.path for x in recorder[0].inputs] == [str(long_silence.resolve())]
    assert out.status == "completed" and out.text == "" and out.finish_reason == "empty"
    assert out.segments == [] and "no speech detected" in out.warnings
    assert "(no speech recognised)" in text and "Warning: no speech detected" in text


def test_server_streams_above_the_models_threshold():
    from server import intake

    assert intake.STREAM_ABOVE_S == STREAM_ABOVE_S


def test_decode_or_stream_splits_by_length(tmp_path):
    """asr.audio.io.decode_or_stream (the pipeline's and the batch's split): a short file is decoded in memory, one
    longer than STREAM_ABOVE_S comes back as the opened file (nothing decoded), a length over max_duration_s is
    refused from the header."""
    import soundfile as sf

    from asr.audio.io import Audio, AudioFile, decode_or_stream
    from asr.errors import AudioTooLargeError

    short, long_ = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, np.zeros(16000 * 2, np.int16), 16000, subtype="PCM_16")
    sf.write(long_, np.zeros(int(8000 * (STREAM_ABOVE_S + 5)), np.int16), 8000, subtype="PCM_16")
    with AudioFile.open(short) as f:
        got = decode_or_stream(f)
        assert isinstance(got, Audio) and got.duration_s == pytest.approx(2.0)
    with AudioFile.open(long_) as f:
        assert decode_or_stream(f) is f
        with pytest.raises(AudioTooLargeError):
            decode_or_stream(f, max_duration_s=STREAM_ABOVE_S)
    with AudioFile.open(short) as f, pytest.raises(AudioTooLargeError):
        decode_or_stream(f, max_duration_s=1.0)
