"""Hostile and odd audio inputs (>= 50, all generated here) through the library, the model, the CLI and the MCP tools.

Every case ends in its documented error (a subclass of `asr.errors.AudioError`; a tool error for the server) or a
sane result (finite 16 kHz mono float32 samples of the expected length; a completed transcription), within a
time bound. One subprocess decodes the whole corpus and bounds its peak memory. The 3-hour file is generated
lazily (a WAV header over a sparse file); the fast test takes it through the MCP tools in a subprocess and bounds
the server's peak RSS, the slow one (`-m slow`) through the library's `transcribe` and the CLI.

Format-level behaviour already covered by tests/test_audio.py (exact subtypes, resampling accuracy, truncation
warnings, FIFO/device handling in asr.audio) is not repeated in detail; here the same kinds of inputs go through
every entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile as sf
from mcp import Client

import asr  # noqa: F401  (BLAS preload before mlx)
from asr.audio.io import SAMPLE_RATE, AudioInfo, load_audio, probe
from asr.errors import (
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    EmptyAudioError,
)
from server.app import create_server
from server.config import Settings
from server.schemas import TranscriptionOutput
from tests.test_audio import encode_pyav, sine
from tests.test_server_support import REPO, fake_loader

# libsndfile seeks to the offset an RF64 ds64 chunk claims; Python's refusal inside its I/O callback is reported as
# "Exception ignored" on stderr (harmless: the decode goes on and ends correctly)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TIME_LIMIT_S = 10.0  # hang guard per input and entry point; generous for a shared 2-core machine
# peak RSS is read from /proc/self/status (VmHWM, the peak of this process image; ru_maxrss would carry the
# parent's peak over fork+exec); where there is no /proc, memory is not checked
HAVE_PROC = Path("/proc/self/status").exists()
PEAK_SRC = """
def peak():
    try:
        return next((int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")), 0.0)
    except OSError:  # no /proc: memory is not checked
        return 0.0
"""  # the peak RSS in MiB, for the scripts the memory tests run in a fresh process
RATE = 16000


# --- writers ---------------------------------------------------------------------------------------------------
def riff(data: bytes, *, channels: int = 1, rate: int = RATE, bits: int = 16, tag: int = 1,
         data_size: int | None = None, riff_size: int | None = None, fmt_size: int = 16,
         with_data: bool = True) -> bytes:
    """A RIFF/WAVE file with every header field under control (sizes are not checked)."""
    align = (channels * bits // 8) & 0xFFFF
    fmt = (b"fmt " + fmt_size.to_bytes(4, "little") + tag.to_bytes(2, "little") + channels.to_bytes(2, "little")
           + rate.to_bytes(4, "little") + ((rate * align) & 0xFFFFFFFF).to_bytes(4, "little")
           + align.to_bytes(2, "little") + bits.to_bytes(2, "little"))
    body = b"WAVE" + fmt
    if with_data:
        body += b"data" + (len(data) if data_size is None else data_size).to_bytes(4, "little") + data
    return b"RIFF" + (len(body) if riff_size is None else riff_size).to_bytes(4, "little") + body


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def tone(seconds: float = 1.0, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    return sine(440, rate, seconds, amp)


def noise(seconds: float, rate: int = RATE, amp: float = 0.3) -> np.ndarray:
    return (amp * np.random.default_rng(0).uniform(-1, 1, round(seconds * rate))).astype(np.float32)


def _write(data: bytes) -> Callable[[Path, str], Path]:
    def make(d: Path, name: str) -> Path:
        path = d / name
        path.write_bytes(data)
        return path

    return make


def _sf(x: np.ndarray | Callable[[], np.ndarray], rate: int = RATE, **kw) -> Callable[[Path, str], Path]:
    def make(d: Path, name: str) -> Path:
        path = d / name
        sf.write(path, x() if callable(x) else x, rate, **kw)
        return path

    return make


def _cut(src: Callable[[Path, str], Path], keep: int | float) -> Callable[[Path, str], Path]:
    """The first `keep` bytes (an int) or that fraction (a float) of what `src` writes."""

    def make(d: Path, name: str) -> Path:
        full = src(d, "full-" + name)
        data = full.read_bytes()
        full.unlink()
        n = keep if isinstance(keep, int) else int(len(data) * keep)
        return _write(data[:n])(d, name)

    return make


def _renamed(src: Callable[[Path, str], Path]) -> Callable[[Path, str], Path]:
    def make(d: Path, name: str) -> Path:
        return src(d, "src-" + name).rename(d / name)

    return make


def _pyav(container: str, codec: str, seconds: float = 1.0) -> Callable[[Path, str], Path]:
    def make(d: Path, name: str) -> Path:
        path = d / name
        encode_pyav(path, container, codec, np.stack([tone(seconds, 44100)] * 2), 44100, 44100)
        return path

    return make


def _video_only(d: Path, name: str) -> Path:
    import av

    path = d / name
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    raw = b"".join(b"\0" + bytes(range(16)) * 3 for _ in range(16))
    ihdr = (16).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _flac_huge_length(d: Path, name: str) -> Path:
    path = d / name
    sf.write(path, tone(), RATE, format="FLAC")
    data = bytearray(path.read_bytes())
    word = int.from_bytes(data[18:26], "big") | (2**36 - 1)  # STREAMINFO total samples: ~50 days at 16 kHz
    data[18:26] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def _rf64_huge(d: Path, name: str) -> Path:
    data = pcm16(tone())
    ds64 = b"ds64" + (28).to_bytes(4, "little") + (2**62).to_bytes(8, "little") * 3 + bytes(4)
    return _write(b"RF64" + b"\xff" * 4 + b"WAVE" + ds64 + riff(data, data_size=0xFFFFFFFF)[12:])(d, name)


def _fs(kind: str) -> Callable[[Path, str], Path]:
    def make(d: Path, name: str) -> Path:
        path = d / name
        if kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "loop":
            os.symlink(d / (name + ".b"), path)
            os.symlink(path, d / (name + ".b"))
        elif kind == "dangling":
            os.symlink(d / "gone.wav", path)
        elif kind == "socket":
            cwd = os.getcwd()
            os.chdir(d)  # a relative name: AF_UNIX paths are limited to ~104 bytes
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.bind(name)
                sock.close()
            finally:
                os.chdir(cwd)
        elif kind in ("devzero", "proc"):
            os.symlink("/dev/zero" if kind == "devzero" else "/proc/self/environ", path)
        elif kind == "unreadable":
            sf.write(path, tone(), RATE, subtype="PCM_16")
        elif kind == "unicode":
            path = d / "a\nb \u65e5\u672c \u202e.wav"  # newline, CJK, right-to-left override in the name
            sf.write(path, tone(), RATE, subtype="PCM_16")
        elif kind == "nul":
            return Path(str(d / "a.wav") + "\x00.txt")
        elif kind == "toolong":
            return d / ("x" * 300 + ".wav")
        # "missing": nothing is created
        return path

    return make


@dataclass(frozen=True)
class Case:
    name: str  # also the file name
    make: Callable[[Path, str], Path]
    error: type[AudioError] | None  # what the library raises, or None for a result
    seconds: float | None = None  # a result's duration (None: not checked)
    channels: int | None = None
    server: str | None = None  # a substring of the MCP tool error (None: the server transcribes it)
    warns: bool = False  # the result says the file looks truncated
    fs: bool = False  # a filesystem oddity rather than bytes

    @property
    def fails_in_server(self) -> bool:
        return self.server is not None or self.error is not None


NOT_AUDIO = "Cannot transcribe"  # the server's prefix for every audio error


def _wav(x, rate=RATE, **kw):
    return _sf(x, rate, format="WAV", **kw)


CASES = [
    # -- empty and too short
    Case("empty.wav", _write(b""), EmptyAudioError, server=NOT_AUDIO),
    Case("zero-samples.wav", _wav(np.zeros(0, np.float32)), EmptyAudioError, server=NOT_AUDIO),
    Case("one-sample.wav", _wav(np.full(1, 0.5, np.float32)), EmptyAudioError, server=NOT_AUDIO),
    Case("under-one-frame.wav", _wav(tone(399 / RATE)), EmptyAudioError, server=NOT_AUDIO),
    Case("one-frame.wav", _wav(tone(400 / RATE)), None, seconds=0.025),
    Case("under-one-frame-8k.wav", _wav(tone(150 / 8000, 8000), 8000), EmptyAudioError, server=NOT_AUDIO),
    Case("header-only.wav", _write(riff(b"", data_size=32000)), EmptyAudioError, server=NOT_AUDIO),
    # -- truncated
    Case("cut-20-bytes.wav", _cut(_wav(tone()), 20), AudioDecodeError, server=NOT_AUDIO),
    Case("half.wav", _cut(_wav(tone(2.0)), 0.5), None, seconds=1.0, warns=True),
    Case("cut-30-bytes.flac", _cut(_sf(tone(), format="FLAC"), 30), AudioDecodeError, server=NOT_AUDIO),
    Case("half.flac", _cut(_sf(tone(2.0), format="FLAC"), 0.5), None, warns=True),
    Case("cut-10-bytes.mp3", _cut(_sf(tone(), format="MP3"), 10), AudioDecodeError, server=NOT_AUDIO),
    Case("half.mp3", _cut(_sf(tone(2.0), 44100, format="MP3"), 0.5), None),
    Case("cut-200-bytes.m4a", _cut(_pyav("mp4", "aac"), 200), AudioDecodeError, server=NOT_AUDIO),
    Case("half.m4a", _cut(_pyav("mp4", "aac", 2.0), 0.5), AudioDecodeError, server=NOT_AUDIO),  # index at the end
    Case("half.ogg", _cut(_sf(lambda: noise(4.0, 44100), 44100, format="OGG"), 0.5), None),
    Case("cut-100-bytes.opus", _cut(_sf(tone(), 48000, format="OGG", subtype="OPUS"), 100), AudioDecodeError,
         server=NOT_AUDIO),
    # -- wrong or missing extension
    Case("flac-named.wav", _renamed(_sf(tone(), format="FLAC")), None, seconds=1.0),
    Case("wav-named.mp3", _renamed(_wav(tone())), None, seconds=1.0),
    Case("m4a-named.wav", _renamed(_pyav("mp4", "aac")), None),
    Case("ogg-named.m4a", _renamed(_sf(tone(), format="OGG")), None),
    Case("mp3-no-extension", _renamed(_sf(tone(), 44100, format="MP3")), None),
    # -- not audio at all
    Case("text.wav", _write(b"this is not audio, just text\n" * 40), AudioDecodeError, server=NOT_AUDIO),
    Case("pdf.wav", _write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 30),
         AudioDecodeError, server=NOT_AUDIO),
    Case("png.wav", _write(_png()), AudioDecodeError, server=NOT_AUDIO),
    Case("jpeg.flac", _write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + bytes(2000) + b"\xff\xd9"),
         AudioDecodeError, server=NOT_AUDIO),
    Case("zip.m4a", _write(b"PK\x03\x04" + bytes(26) + b"PK\x05\x06" + bytes(18)), AudioDecodeError, server=NOT_AUDIO),
    Case("html.mp3", _write(b"<!DOCTYPE html><html><body>" + b"<p>hello</p>" * 100 + b"</body></html>"),
         AudioDecodeError, server=NOT_AUDIO),
    Case("elf.wav", _write(b"\x7fELF\x02\x01\x01" + bytes(4000)), AudioDecodeError, server=NOT_AUDIO),
    Case("random.wav", _write(np.random.default_rng(0).bytes(1 << 16)), AudioDecodeError, server=NOT_AUDIO),
    Case("zeros.wav", _write(bytes(1 << 20)), AudioDecodeError, server=NOT_AUDIO),
    Case("video-only.mp4", _video_only, AudioDecodeError, server="no audio track"),
    # playlists that would make FFmpeg open other files (HLS, concat) must not be followed
    Case("playlist.m3u8", _write(b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n/etc/passwd\n#EXT-X-ENDLIST\n"),
         AudioDecodeError, server=NOT_AUDIO),
    Case("concat.wav", _write(b"ffconcat version 1.0\nfile /etc/passwd\n"), AudioDecodeError, server=NOT_AUDIO),
    # -- RIFF headers with absurd fields (nothing may allocate what a header claims)
    Case("riff-data-4gb.wav", _write(riff(pcm16(tone()), data_size=0xFFFFFFF0)), None, seconds=1.0, warns=True),
    Case("riff-4gb-200-bytes.wav", _write(riff(bytes(200), data_size=0xFFFFFFF0, riff_size=0xFFFFFFF0)),
         EmptyAudioError, server=NOT_AUDIO),
    Case("riff-1000-channels.wav", _write(riff(bytes(2000 * 1000), channels=1000, data_size=0x7FFFFFF0)), None,
         channels=1000, server="silent"),
    Case("riff-65535-channels.wav", _write(riff(pcm16(tone()), channels=65535)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-0-channels.wav", _write(riff(pcm16(tone()), channels=0)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-rate-0.wav", _write(riff(pcm16(tone()), rate=0)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-rate-4ghz.wav", _write(riff(pcm16(tone()), rate=0xFFFFFFFF)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-0-bits.wav", _write(riff(pcm16(tone()), bits=0)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-unknown-codec.wav", _write(riff(pcm16(tone()), tag=99)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-float-16bit.wav", _write(riff(pcm16(tone()), tag=3)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-fmt-4gb.wav", _write(riff(pcm16(tone()), fmt_size=0xFFFFFFF0)), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-no-chunks.wav", _write(b"RIFF\x04\x00\x00\x00WAVE"), AudioDecodeError, server=NOT_AUDIO),
    Case("riff-no-data.wav", _write(riff(b"", with_data=False)), AudioDecodeError, server=NOT_AUDIO),
    Case("rf64-huge-ds64.wav", _rf64_huge, None, seconds=1.0),
    Case("flac-50-days.flac", _flac_huge_length, None, seconds=1.0, server="limit"),  # server: over 3 h by header
    # -- sample formats, channels, rates
    Case("8-channels.wav", _wav(np.stack([tone()] * 8, axis=1)), None, seconds=1.0, channels=8),
    Case("64-channels.wav", _wav(np.stack([tone(0.1)] * 64, axis=1)), None, seconds=0.1, channels=64),
    Case("8-bit.wav", _wav(tone(), subtype="PCM_U8"), None, seconds=1.0),
    Case("24-bit.wav", _wav(tone(), subtype="PCM_24"), None, seconds=1.0),
    Case("float64.wav", _wav(tone(), subtype="DOUBLE"), None, seconds=1.0),
    Case("ulaw.wav", _wav(tone(), subtype="ULAW"), None, seconds=1.0),
    Case("ima-adpcm.wav", _wav(tone(), subtype="IMA_ADPCM"), None, seconds=1.0),
    Case("8khz.wav", _wav(tone(1.0, 8000), 8000), None, seconds=1.0),
    Case("192khz.wav", _wav(tone(1.0, 192000), 192000), None, seconds=1.0),
    Case("w64.w64", _sf(tone(), format="W64"), None, seconds=1.0),
    Case("aiff.aiff", _sf(tone(), format="AIFF"), None, seconds=1.0),
    # -- sample values
    Case("nan.wav", _wav(lambda: np.where(np.arange(RATE) == 800, np.nan, tone()), subtype="FLOAT"),
         AudioDecodeError, server=NOT_AUDIO),
    Case("inf.wav", _wav(lambda: np.where(np.arange(RATE) == 800, np.inf, tone()), subtype="FLOAT"),
         AudioDecodeError, server=NOT_AUDIO),
    Case("minus-inf-stereo.wav", _wav(lambda: np.stack([tone(), np.where(np.arange(RATE) == 9, -np.inf, 0)], 1),
                                      subtype="FLOAT"), AudioDecodeError, server=NOT_AUDIO),
    Case("clipping.wav", _wav(lambda: np.sign(tone()) * 1.0), None, seconds=1.0),
    Case("float-over-range.wav", _wav(lambda: tone() * 16, subtype="FLOAT"), None, seconds=1.0),
    Case("subnormal.wav", _wav(lambda: np.full(RATE, 1e-40, np.float32), subtype="FLOAT"), None, seconds=1.0,
         server="silent"),
    Case("silence.wav", _wav(np.zeros(RATE * 2, np.float32)), None, seconds=2.0, server="silent"),
    Case("white-noise.wav", _wav(lambda: noise(2.0, amp=1.0)), None, seconds=2.0),
    Case("dc-offset.wav", _wav(np.full(RATE, 0.5, np.float32)), None, seconds=1.0),
    # -- filesystem oddities
    Case("a-directory.wav", _fs("dir"), AudioNotFoundError, server="folder", fs=True),
    Case("fifo.wav", _fs("fifo"), AudioNotFoundError, server="FIFO", fs=True),
    Case("symlink-loop.wav", _fs("loop"), AudioNotFoundError, server="", fs=True),
    Case("dangling-link.wav", _fs("dangling"), AudioNotFoundError, server="does not exist", fs=True),
    Case("missing.wav", _fs("missing"), AudioNotFoundError, server="does not exist", fs=True),
    Case("socket.wav", _fs("socket"), AudioNotFoundError, server="socket", fs=True),
    Case("link-to-dev-zero.wav", _fs("devzero"), AudioNotFoundError, server="outside the folders", fs=True),
    Case("link-to-proc.wav", _fs("proc"), AudioNotFoundError, server="outside the folders", fs=True),
    Case("unreadable.wav", _fs("unreadable"), AudioNotFoundError, server="permission", fs=True),
    Case("nul-in-path.wav", _fs("nul"), AudioNotFoundError, server="NUL", fs=True),
    Case("name-too-long.wav", _fs("toolong"), AudioNotFoundError, server="", fs=True),
    Case("unicode-name.wav", _fs("unicode"), None, seconds=1.0, fs=True),
]
BY_NAME = {c.name: c for c in CASES}


def build_corpus(d: Path) -> dict[str, Path]:
    """Write every case under `d` (nothing big: the largest file is 1 MiB); returns name -> path."""
    d.mkdir(parents=True, exist_ok=True)
    return {c.name: c.make(d, c.name) for c in CASES}


# Root reads every file: there the unreadable case is left out (and skipped where it is a test of its own);
# tests/test_server_paths.py::test_permission_denied checks it in a process without root's rights.
AS_ROOT = os.geteuid() == 0


def runnable(cases: list[Case]) -> list[Case]:
    """The cases this process can set up: all of them, less the unreadable file when running as root."""
    return [c for c in cases if not (AS_ROOT and c.name == "unreadable.wav")]


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """Make `path` unreadable (chmod 000) for the duration."""
    if AS_ROOT:
        pytest.skip("root reads every file; checked in a process that drops root (test_server_paths.py)")
    os.chmod(path, 0)
    try:
        yield
    finally:
        os.chmod(path, 0o644)


def conditions(case: Case, path: Path):
    return unreadable(path) if case.name == "unreadable.wav" else contextlib.nullcontext()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "audio")


def check_audio(case: Case, audio) -> None:
    """A sane decode: finite float32 mono samples at 16 kHz, at least one frame, the expected length."""
    x = audio.samples
    assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    assert audio.sample_rate == SAMPLE_RATE and len(x) >= 400 and np.isfinite(x).all()
    assert audio.duration_s == pytest.approx(len(x) / SAMPLE_RATE)
    if case.seconds is not None:
        assert audio.duration_s == pytest.approx(case.seconds, abs=0.06), case.name
    if case.channels is not None:
        assert audio.channels == case.channels
    if case.warns:
        assert any("truncated" in w for w in audio.warnings), audio.warnings


def outcome(fn: Callable[[], object]) -> object:
    """fn's value, or the AudioError it raised."""
    try:
        return fn()
    except AudioError as exc:
        return exc


# --- the library -----------------------------------------------------------------------------------------------
def test_the_corpus_is_big_and_varied():
    assert len(CASES) >= 50 and len(BY_NAME) == len(CASES)
    assert sum(c.error is None for c in CASES) >= 20 and sum(c.error is not None for c in CASES) >= 40


@pytest.mark.timeout(6 * TIME_LIMIT_S)  # a hostile header must not make decoding spin (fixtures included)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_library(corpus, name):
    case, path = BY_NAME[name], corpus[name]
    with conditions(case, path):
        got = outcome(lambda: load_audio(path))
        header = outcome(lambda: probe(path))
    if case.error is None:
        assert not isinstance(got, Exception), f"{name}: {got!r}"
        check_audio(case, got)
        assert isinstance(header, AudioInfo) and header.channels == got.channels
    else:
        assert type(got) is case.error, f"{name}: {got!r}"
        message = str(got)
        assert len(message) > 30 and "Traceback" not in message
        assert isinstance(header, (AudioError, AudioInfo))  # a header may look fine when the data is not
    if not case.fs:  # the same bytes, in memory, end the same way
        data = outcome(lambda: load_audio(path.read_bytes()))
        assert type(data) is type(got) or (case.error is None and not isinstance(data, Exception)), (name, data)


def test_library_memory_is_bounded(corpus, tmp_path):
    """The whole corpus decoded in one fresh process: the peak RSS stays small whatever the headers claim."""
    names = [n for n, c in BY_NAME.items() if c.name != "unreadable.wav" and c.name != "nul-in-path.wav"]
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps([str(corpus[n]) for n in names]))
    code = PEAK_SRC + textwrap.dedent("""
        import json, sys, asr
        from asr.audio.io import load_audio, probe
        from asr.errors import AudioError
        base = peak()
        for p in json.load(open(sys.argv[1])):
            for fn in (probe, load_audio):
                try:
                    fn(p)
                except AudioError:
                    pass
        print(json.dumps({"base": base, "peak": peak()}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(listing)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"corpus decode: peak RSS {mem['base']:.0f} -> {mem['peak']:.0f} MiB")
    assert mem["peak"] - mem["base"] < 200 or not HAVE_PROC, mem  # MiB; the biggest legitimate decode here is a few MiB


# --- the model (tiny random weights) ---------------------------------------------------------------------------
@pytest.mark.timeout(12 * TIME_LIMIT_S)  # no spinning on any input (fixtures included)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_model(tiny_model, corpus, name):
    case, path = BY_NAME[name], corpus[name]
    with conditions(case, path):
        got = outcome(lambda: tiny_model.transcribe(str(path), max_new_tokens=2))
    if case.error is not None:
        assert type(got) is case.error, f"{name}: {got!r}"
        return
    assert not isinstance(got, Exception), f"{name}: {got!r}"
    assert isinstance(got.text, str) and got.finish_reason in ("stop", "length", "repetition", "empty")
    duration = got.timings.audio_duration_s
    if case.seconds is not None:
        assert duration == pytest.approx(case.seconds, abs=0.06)
    assert all(0 <= s.start <= s.end <= duration + 1e-3 for s in got.segments)


# --- the CLI -----------------------------------------------------------------------------------------------------
def test_cli(tiny_checkpoint, tiny_model, corpus, tmp_path, capsys):
    """One `funasr-nano transcribe` over the whole corpus: one error line per bad input, a file per good one."""
    from asr.cli import main

    usable = runnable([c for c in CASES if c.name != "nul-in-path.wav"])  # argv cannot carry a NUL byte
    out = tmp_path / "out"
    argv = ["transcribe", *(str(corpus[c.name]) for c in usable), "-m", str(tiny_checkpoint), "--dtype", "float32",
            "--max-new-tokens", "1", "-f", "json", "-o", str(out)]
    with contextlib.nullcontext() if AS_ROOT else unreadable(corpus["unreadable.wav"]):
        status = main(argv)
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in captured.err
    for case in usable:
        path = str(corpus[case.name])
        mine = [line for line in errors if line.startswith(f"error: {path}: ")]
        if case.error is not None:
            assert len(mine) == 1, (case.name, errors)
        else:
            assert not mine, mine
            result = json.loads((out / (Path(path).stem + ".json")).read_text())
            assert isinstance(result["text"], str)
    assert len(errors) == sum(c.error is not None for c in usable)


# --- the MCP tools -------------------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_mcp_tools(corpus):
    """transcribe_file on every case (real decoding, fake model): a tool error that says what is wrong, or a
    completed transcription of the right length; the server keeps serving throughout."""
    root = next(iter(corpus.values())).parent
    loader, model = fake_loader()
    server = create_server(Settings(allowed_roots=[root]), model_loader=loader)
    async with Client(server, mode="legacy") as client:
        for case in runnable(CASES):
            path = corpus[case.name]
            with conditions(case, path), anyio.fail_after(TIME_LIMIT_S):  # no spinning on any input
                result = await client.call_tool("transcribe_file", {"path": str(path)})
            text = "\n".join(c.text for c in result.content if c.type == "text")
            assert "Traceback" not in text and "internal error" not in text, (case.name, text)
            if case.fails_in_server:
                assert result.is_error, (case.name, text)
                assert result.structured_content is None
                assert (case.server or "") in text, (case.name, text)
            else:
                assert not result.is_error, (case.name, text)
                out = TranscriptionOutput.model_validate(result.structured_content)
                assert out.status == "completed" and out.source == str(path)
                if case.seconds is not None:
                    assert out.duration_s == pytest.approx(case.seconds, abs=0.06)
                if case.warns:
                    assert any("truncated" in w for w in out.warnings)
        status = await client.call_tool("server_status", {})
        assert not status.is_error
    completed = sum(not c.fails_in_server for c in runnable(CASES))
    assert len(model.calls) == completed  # every refusal happened before the model


# --- the 3-hour file ------------------------------------------------------------------------------------------------
def write_long_wav(path: Path, seconds: float, tone_s: float = 2.0) -> Path:
    """A 16 kHz mono PCM-16 WAV of `seconds`: a tone at the start, then zeros left as a hole in a sparse file
    (3 hours are 345 MB long but take ~nothing on disk and ~nothing to write)."""
    n = int(seconds * RATE)
    head = riff(b"", data_size=2 * n, riff_size=36 + 2 * n)
    with open(path, "wb") as f:
        f.write(head)
        f.write(pcm16(tone(tone_s, amp=0.3)))
        f.truncate(len(head) + 2 * n)
    return path


THREE_HOURS = 3 * 3600.0

_SERVER_SCRIPT = PEAK_SRC + """
import json, sys, time
import anyio
from mcp import Client
from server.app import create_server
from server.config import Settings
from tests.test_server_support import FakeModel  # reads a file handed over for streaming block by block

async def main(path, root, max_duration):
    server = create_server(Settings(allowed_roots=[root], max_duration_s=max_duration, call_budget_s=120),
                           model_loader=lambda: FakeModel())
    async with Client(server, mode="legacy") as client:
        await client.call_tool("list_languages", {})
        base = peak()
        t0 = time.perf_counter()
        r = await client.call_tool("transcribe_file", {"path": path})
        print(json.dumps({"base": base, "peak": peak(), "seconds": time.perf_counter() - t0,
                          "error": r.is_error, "out": r.structured_content,
                          "text": [c.text for c in r.content][0][:300]}))

anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
"""


def _serve_long(path: Path, max_duration: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SERVER_SCRIPT, str(path), str(path.parent), str(max_duration)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_three_hours_through_mcp(tmp_path):
    """A 3-hour file (the default --max-duration-s) through transcribe_file: transcribed, or refused with a clear
    error, in bounded time and with the server's peak RSS far below the 691 MB its samples take as float32."""
    path = write_long_wav(tmp_path / "three-hours.wav", THREE_HOURS)
    got = _serve_long(path, THREE_HOURS)
    print(f"3 h through MCP: peak RSS {got['base']:.0f} -> {got['peak']:.0f} MiB in {got['seconds']:.1f} s")
    assert not got["error"], got["text"]
    assert got["out"]["status"] in ("completed", "running", "queued")
    assert got["out"]["duration_s"] == pytest.approx(THREE_HOURS, abs=0.1)
    assert got["peak"] - got["base"] < 150 or not HAVE_PROC, got  # MiB
    # a minute over the limit: refused from the header, before decoding
    over = _serve_long(write_long_wav(tmp_path / "over.wav", THREE_HOURS + 60), THREE_HOURS)
    assert over["error"] and "limit" in over["text"], over


@pytest.mark.parametrize("hours", [1, pytest.param(3, marks=pytest.mark.slow)])  # 3 h: the same bound, +23 s
def test_webm_without_a_duration_through_mcp(tmp_path, hours):
    """WebM as browsers record it says no duration: the server does not decode it into memory but hands the opened
    file to the model, which streams it; the peak RSS stays within the 3 h WAV's bound above (before: 3.1 GB peak
    for 3 h). Past the duration limit it is refused while it is read."""
    import soundfile as sf

    from tests.test_server_support import TESTDATA, duration_less_webm

    x, _ = sf.read(TESTDATA / "audio" / "en" / "jfk.wav", dtype="float32")  # 11 s; 66 s a round, 55 rounds an hour
    path = duration_less_webm(tmp_path / f"{hours}h.webm", np.tile(x, 6), repeat=55 * hours)
    got = _serve_long(path, THREE_HOURS)
    print(f"{hours} h WebM through MCP: peak RSS {got['base']:.0f} -> {got['peak']:.0f} MiB in {got['seconds']:.1f} s")
    assert not got["error"], got["text"]
    assert got["out"]["status"] == "completed"
    assert got["out"]["duration_s"] == pytest.approx(3631.0 * hours, abs=1.0)
    assert got["peak"] - got["base"] < 150 or not HAVE_PROC, got  # MiB
    if hours == 1:
        over = _serve_long(path, 1800.0)
        assert over["error"] and "1800 s limit" in over["text"] and "at least" in over["text"], over


@pytest.mark.slow
def test_three_hours_through_the_library_and_cli(tiny_checkpoint, tmp_path):
    """The model streams a 3-hour file (two block passes) in bounded memory; the CLI does the same. ~1 min."""
    path = write_long_wav(tmp_path / "three-hours.wav", THREE_HOURS)
    code = PEAK_SRC + textwrap.dedent("""
        import json, sys, time, asr
        model = asr.load_model(sys.argv[2], dtype="float32")
        base, t0 = peak(), time.perf_counter()
        r = model.transcribe(sys.argv[1], max_new_tokens=2)
        print(json.dumps({"base": base, "peak": peak(), "seconds": time.perf_counter() - t0,
                          "duration": r.timings.audio_duration_s, "warnings": r.warnings}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tiny_checkpoint)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"3 h through transcribe: peak RSS {got['base']:.0f} -> {got['peak']:.0f} MiB in {got['seconds']:.1f} s")
    assert got["duration"] == pytest.approx(THREE_HOURS, abs=0.1)
    assert got["peak"] - got["base"] < 150 or not HAVE_PROC, got
    cli = subprocess.run([sys.executable, "-m", "asr.cli", "transcribe", str(path), "-m", str(tiny_checkpoint),
                          "--dtype", "float32", "--max-new-tokens", "2", "-f", "json"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert json.loads(cli.stdout)["timings"]["audio_duration_s"] == pytest.approx(THREE_HOURS, abs=0.1)
