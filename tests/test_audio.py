"""asr.audio: every input people have -> 16 kHz mono float32, and a typed error for everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from asr.audio.io import MIN_SAMPLES, SAMPLE_RATE, Audio, AudioInfo, iter_audio_blocks, load_audio, probe
from asr.errors import (
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    AudioTooLargeError,
    EmptyAudioError,
    InvalidOptionError,
)
from tests.test_server_support import duration_less_webm

TESTDATA = Path(__file__).resolve().parent / "data"
AUDIO = TESTDATA / "audio"


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def encode_pyav(path: Path, container: str, codec: str, x: np.ndarray, rate: int, out_rate: int) -> None:
    """Encode mono/stereo float `x` (channels, n) with FFmpeg through PyAV."""
    import av

    layout = "stereo" if x.shape[0] == 2 else "mono"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=out_rate, layout=layout)
        stream.bit_rate = 128_000
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=out_rate)
        for f in [*resampler.resample(frame), *resampler.resample(None), None]:
            for packet in stream.encode(f):
                out.mux(packet)


def raised(fn, exc: type[Exception], match: str | None = None) -> Exception:
    """The `exc` that fn() raises (a hang is caught by pytest-timeout, pyproject.toml)."""
    with pytest.raises(exc, match=match) as info:
        fn()
    return info.value


# --- formats and rates -------------------------------------------------------------------------
@pytest.mark.parametrize("subtype, tol", [("PCM_16", 1 / 32768), ("PCM_24", 1 / 2**23), ("FLOAT", 0),
                                          ("DOUBLE", 1e-7), ("PCM_U8", 1 / 128), ("PCM_S8", 1 / 128)])
def test_wav_subtypes_at_16k(tmp_path, subtype, tol):
    x = sine(440, SAMPLE_RATE, 1.0)
    fmt = "AIFF" if subtype == "PCM_S8" else "WAV"  # WAV has no signed 8-bit
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, SAMPLE_RATE, subtype=subtype, format=fmt)
    audio = load_audio(path)
    assert isinstance(audio, Audio)
    assert audio.samples.dtype == np.float32 and audio.samples.flags.c_contiguous and audio.samples.ndim == 1
    assert (audio.sample_rate, audio.original_sample_rate, audio.channels) == (SAMPLE_RATE, SAMPLE_RATE, 1)
    assert len(audio.samples) == len(x) and audio.duration_s == pytest.approx(1.0)
    np.testing.assert_allclose(audio.samples, x, atol=tol + 1e-9)
    assert audio.decode_s >= 0 and audio.warnings == []


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 192000])
def test_resampling_keeps_length_and_frequency(tmp_path, rate):
    x = sine(1000, rate, 1.5)
    path = tmp_path / "a.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.original_sample_rate == rate
    assert abs(len(audio.samples) - round(len(x) * SAMPLE_RATE / rate)) <= 1
    assert peak_hz(audio.samples) == pytest.approx(1000, abs=2)
    mid = audio.samples[2000:-2000]  # away from the resampler's edges
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)
    np.testing.assert_allclose(audio.samples, soxr.resample(x, rate, SAMPLE_RATE, quality="HQ"), atol=1e-5)


def test_resampler_removes_content_above_8k(tmp_path):
    x = sine(1000, 48000, 1.0) + sine(12000, 48000, 1.0, amp=0.3)  # 12 kHz must not alias to 4 kHz
    path = tmp_path / "a.wav"
    sf.write(path, x, 48000, subtype="FLOAT")
    y = load_audio(path).samples
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert spec[4000 * len(y) // SAMPLE_RATE] < 1e-3 * spec.max()


def test_stereo_is_the_mean_of_channels(tmp_path):
    left, right = sine(440, SAMPLE_RATE, 0.5), sine(660, SAMPLE_RATE, 0.5, amp=0.25)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.channels == 2
    np.testing.assert_allclose(audio.samples, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("fmt, subtype, ext", [("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"),
                                               ("OGG", "OPUS", "opus"), ("MP3", "MPEG_LAYER_III", "mp3")])
def test_libsndfile_formats(tmp_path, fmt, subtype, ext):
    rate = 48000 if subtype == "OPUS" else 44100
    path = tmp_path / f"a.{ext}"
    sf.write(path, np.stack([sine(1000, rate, 2.0)] * 2, axis=1), rate, format=fmt, subtype=subtype)
    info = probe(path)
    assert (info.format, info.sample_rate, info.channels) == (fmt.lower(), rate, 2)
    audio = load_audio(path)
    assert audio.format == fmt.lower() and audio.original_sample_rate == rate
    assert audio.duration_s == pytest.approx(2.0, abs=0.08)
    assert peak_hz(audio.samples) == pytest.approx(1000, abs=2)
    if fmt == "FLAC":
        np.testing.assert_allclose(audio.samples, soxr.resample(sine(1000, rate, 2.0), rate, SAMPLE_RATE, "HQ"),
                                   atol=1e-4)


@pytest.mark.parametrize("container, codec, ext, rate", [("mp4", "aac", "m4a", 44100), ("webm", "libopus", "webm", 48000),
                                                         ("matroska", "libopus", "mkv", 48000),
                                                         ("asf", "wmav2", "wma", 44100), ("mp4", "alac", "m4a", 44100)])
def test_ffmpeg_formats(tmp_path, container, codec, ext, rate):
    x = np.stack([sine(1000, 44100, 2.0), sine(1000, 44100, 2.0, amp=0.3)])
    path = tmp_path / f"a.{ext}"
    encode_pyav(path, container, codec, x, 44100, rate)
    info = probe(path)
    assert (info.format, info.sample_rate, info.channels) == (ext, rate, 2)
    assert info.duration_s == pytest.approx(2.0, abs=0.1) and info.size_bytes == path.stat().st_size
    audio = load_audio(path)
    assert (audio.format, audio.original_sample_rate, audio.channels) == (ext, rate, 2)
    assert audio.duration_s == pytest.approx(2.0, abs=0.1)  # AAC/Opus priming may add a few ms
    assert peak_hz(audio.samples) == pytest.approx(1000, abs=2)
    assert np.sqrt(np.mean(audio.samples[4000:-4000] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)
    from_bytes = load_audio(path.read_bytes())
    np.testing.assert_array_equal(from_bytes.samples, audio.samples)


def test_bytes_input_equals_path(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, sine(300, 22050, 1.0), 22050)
    a, b = load_audio(path), load_audio(path.read_bytes())
    np.testing.assert_array_equal(a.samples, b.samples)
    assert probe(path.read_bytes()) == AudioInfo(None, "flac", "pcm_16", 22050, 1, 1.0, path.stat().st_size)
    assert load_audio(bytearray(path.read_bytes())).duration_s == a.duration_s


def test_probe_reads_only_the_header(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros((48000 * 3, 2), np.int16), 48000, subtype="PCM_16")
    assert probe(str(path)) == AudioInfo(str(path), "wav", "pcm_16", 48000, 2, 3.0, path.stat().st_size)


# --- the real clips ----------------------------------------------------------------------------
def test_testdata_wavs_are_bit_exact():
    wavs = sorted(AUDIO.glob("*/*.wav"))
    assert wavs
    for path in wavs:
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            ref = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        audio = load_audio(path)
        np.testing.assert_array_equal(audio.samples, ref, err_msg=str(path))


def test_testdata_mp3_matches_its_ffmpeg_decode():
    audio = load_audio(AUDIO / "original" / "example_zh_48k.mp3")
    assert (audio.format, audio.original_sample_rate) == ("mp3", 48000)
    assert audio.duration_s == pytest.approx(5.6, abs=0.1)
    ref = load_audio(AUDIO / "zh" / "example_zh.wav").samples
    n = min(len(ref), len(audio.samples)) - 2000
    best = max(np.corrcoef(audio.samples[1000 + lag:1000 + lag + n - 1000], ref[1000:n])[0, 1]
               for lag in range(-200, 201, 1))
    assert best > 0.99


# --- numpy input -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, scale, offset", [(np.int16, 32768, 0), (np.int32, 2**31, 0), (np.uint8, 128, 128),
                                                  (np.int8, 128, 0), (np.float32, 1, 0), (np.float64, 1, 0)])
def test_numpy_dtypes(dtype, scale, offset):
    x = sine(440, SAMPLE_RATE, 0.5)
    raw = (np.round(x * (scale - 1)) + offset).astype(dtype) if scale > 1 else x.astype(dtype)
    audio = load_audio(raw)
    assert audio.samples.dtype == np.float32 and audio.format == "array"
    np.testing.assert_allclose(audio.samples, (raw.astype(np.float64) - offset) / scale, atol=1e-7)
    assert audio.original_sample_rate == SAMPLE_RATE  # sample_rate=None means 16 kHz, as upstream


def test_numpy_layouts_and_rates():
    x = sine(1000, 48000, 1.0)
    two = np.stack([x, x * 0.5])
    a, b = load_audio(two, 48000), load_audio(two.T.copy(), 48000)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.channels == 2 and abs(len(a.samples) - 16000) <= 1
    np.testing.assert_allclose(a.samples, soxr.resample(x * 0.75, 48000, SAMPLE_RATE, "HQ"), atol=1e-5)
    mono = sine(100, SAMPLE_RATE, 0.1)
    assert np.shares_memory(load_audio(mono).samples, mono)  # 16 kHz float32 passes through untouched
    assert load_audio(mono[:, None]).channels == 1
    for bad in (np.zeros((4, 4), np.float32), np.zeros((2, 3, 500), np.float32), np.zeros((20, 900), np.float32)):
        with pytest.raises(AudioDecodeError, match="shape"):
            load_audio(bad)
    with pytest.raises(AudioDecodeError, match="unsupported sample type"):
        load_audio(np.zeros(1000, np.complex64))
    with pytest.raises(InvalidOptionError):
        load_audio(mono, sample_rate=0)
    with pytest.raises(AudioDecodeError, match="NaN"):
        load_audio(np.full(1000, np.nan, np.float32))
    with pytest.raises(EmptyAudioError):
        load_audio(np.zeros(1000, np.float32), 44100)  # 363 samples after resampling
    with pytest.raises(AudioTooLargeError):
        load_audio(np.zeros(16000 * 5, np.float32), max_duration_s=2)


# --- streaming ---------------------------------------------------------------------------------
def test_iter_blocks_equals_load_audio(tmp_path):
    x = np.random.default_rng(0).standard_normal(44100 * 30).astype(np.float32) * 0.1
    path = tmp_path / "a.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    blocks = list(iter_audio_blocks(path, block_s=7.0))
    assert [len(b) for b in blocks[:-1]] == [7 * SAMPLE_RATE] * (len(blocks) - 1)
    assert 0 < len(blocks[-1]) <= 7 * SAMPLE_RATE
    joined = np.concatenate(blocks)
    np.testing.assert_array_equal(joined, load_audio(path).samples)
    np.testing.assert_allclose(joined, soxr.resample(x, 44100, SAMPLE_RATE, quality="HQ"), atol=1e-5)


def test_iter_blocks_memory_is_bounded(tmp_path):
    path = tmp_path / "long.wav"  # 20 minutes of 8 kHz int16: 77 MB once decoded to 16 kHz float32
    chunk = (sine(440, 8000, 60.0) * 32767).astype(np.int16)
    with sf.SoundFile(path, "w", 8000, 1, "PCM_16") as f:
        for _ in range(20):
            f.write(chunk)
    tracemalloc.start()
    try:
        total, count = 0, 0
        for block in iter_audio_blocks(path, block_s=60.0):
            total += len(block)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20 and total == 20 * 60 * SAMPLE_RATE
    assert peak < 25e6, f"peak {peak / 1e6:.1f} MB"


def test_iter_blocks_errors_surface_at_call(tmp_path):
    with pytest.raises(AudioNotFoundError):
        iter_audio_blocks(tmp_path / "missing.wav")
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(16000 * 10, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioTooLargeError):
        iter_audio_blocks(path, max_duration_s=5)
    with pytest.raises(InvalidOptionError):
        iter_audio_blocks(path, block_s=0)
    sf.write(path, np.zeros(100, np.int16), SAMPLE_RATE)
    with pytest.raises(EmptyAudioError):
        list(iter_audio_blocks(path))


# --- errors ------------------------------------------------------------------------------------
def test_missing_directory_symlink_loop(tmp_path):
    e = raised(lambda: load_audio(tmp_path / "nope.wav"), AudioNotFoundError, match="not found")
    assert "check the path" in str(e) and e.__cause__ is None
    raised(lambda: load_audio(tmp_path), AudioNotFoundError, match="directory")
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    raised(lambda: load_audio(tmp_path / "a"), AudioNotFoundError, match="symlink loop")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    raised(lambda: probe(tmp_path / "dangling.wav"), AudioNotFoundError)
    raised(lambda: load_audio(str(tmp_path / "x.wav" / "y.wav")), AudioNotFoundError)
    raised(lambda: load_audio("https://example.com/a.wav"), AudioNotFoundError, match="download")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    results: list[BaseException] = []

    def attempt():
        for fn in (load_audio, probe, iter_audio_blocks):
            try:
                fn(fifo)
            except BaseException as e:  # noqa: BLE001
                results.append(e)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # unblock the reader so the test process can exit
        with open(fifo, "wb"):
            pass
        pytest.fail("opening a FIFO blocked")
    assert len(results) == 3 and all(isinstance(e, AudioNotFoundError) for e in results)
    assert "FIFO" in str(results[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pseudo-files")
def test_devices_and_proc_files():
    raised(lambda: load_audio("/dev/null"), AudioNotFoundError, match="character device")
    raised(lambda: load_audio("/dev/zero"), AudioNotFoundError)
    raised(lambda: load_audio("/proc/self/status"), AudioNotFoundError, match="pseudo-file")


def _wav_bytes(tmp_path, n: int, rate: int = SAMPLE_RATE) -> bytes:
    path = tmp_path / "src.wav"
    sf.write(path, sine(440, rate, n / rate), rate, subtype="PCM_16")
    return path.read_bytes()


@pytest.mark.parametrize("content, ext", [(b"\x89PNG\r\n\x1a\n" + bytes(300), "wav"), (b"hello, world\n" * 50, "wav"),
                                          (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 20, "mp3"),
                                          (bytes(range(256)) * 8, "m4a"), (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav")])
def test_not_audio(tmp_path, content, ext):
    path = tmp_path / f"fake.{ext}"
    path.write_bytes(content)
    e = raised(lambda: load_audio(path), AudioDecodeError, match="Supported: WAV")
    assert "ffmpeg" in str(e) and e.__cause__ is None
    raised(lambda: probe(path), AudioDecodeError)
    raised(lambda: load_audio(content), AudioDecodeError)


def test_empty_and_too_short(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.touch()
    raised(lambda: load_audio(empty), EmptyAudioError, match="0 bytes")
    raised(lambda: load_audio(b""), EmptyAudioError)
    raised(lambda: load_audio(_wav_bytes(tmp_path, 100)), EmptyAudioError, match="100 samples")
    raised(lambda: load_audio(_wav_bytes(tmp_path, 0)), EmptyAudioError, match="no samples")
    raised(lambda: load_audio(_wav_bytes(tmp_path, 1000, 48000)), EmptyAudioError)  # 333 samples at 16 kHz
    assert len(load_audio(_wav_bytes(tmp_path, MIN_SAMPLES)).samples) == MIN_SAMPLES


def test_nan_in_float_wav(tmp_path):
    x = sine(440, SAMPLE_RATE, 1.0)
    x[5000] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    raised(lambda: load_audio(path), AudioDecodeError, match="NaN")
    x[5000] = np.inf
    sf.write(path, x, 44100, subtype="FLOAT")
    raised(lambda: load_audio(path), AudioDecodeError, match="NaN or infinite")


def test_truncated_files(tmp_path):
    """Header cut: AudioDecodeError. Data cut: the part that is there decodes, with a warning."""
    x = sine(440, 44100, 2.0)
    for fmt in ("WAV", "FLAC", "MP3"):
        path = tmp_path / f"full.{fmt.lower()}"
        sf.write(path, x, 44100, format=fmt)
        data = path.read_bytes()
        for cut in (10, 30):
            raised(lambda d=data[:cut]: load_audio(d), (AudioDecodeError, EmptyAudioError))
        half = tmp_path / f"half.{fmt.lower()}"
        half.write_bytes(data[: len(data) // 2])
        audio = load_audio(half)
        assert 0.3 < audio.duration_s < 1.7, fmt
        assert audio.warnings and "truncated" in audio.warnings[0], fmt
        assert peak_hz(audio.samples) == pytest.approx(440, abs=3)


def _riff(data: bytes, data_size: int, channels: int = 1, rate: int = SAMPLE_RATE, bits: int = 16) -> bytes:
    align = channels * bits // 8
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + rate.to_bytes(4, "little") + (rate * align).to_bytes(4, "little") + align.to_bytes(2, "little")
           + bits.to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + data_size.to_bytes(4, "little") + data
    return b"RIFF" + (0xFFFFFFF0).to_bytes(4, "little") + body


def test_riff_claiming_huge_sizes_does_not_allocate(tmp_path):
    pcm = (sine(440, SAMPLE_RATE, 1.0) * 32767).astype("<i2").tobytes()
    path = tmp_path / "huge.wav"
    path.write_bytes(_riff(pcm, 0xFFFFFFF0))
    assert probe(path).duration_s == pytest.approx(1.0, abs=0.01)  # bounded by the file size
    tracemalloc.start()
    try:
        audio = load_audio(path, max_duration_s=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert audio.duration_s == pytest.approx(1.0, abs=0.01) and peak < 20e6
    assert "truncated" in audio.warnings[0]
    raised(lambda: load_audio(_riff(pcm[:200], 0xFFFFFFF0)), EmptyAudioError)
    # 1000 channels claimed: memory per read stays bounded
    wide = load_audio(_riff(bytes(2000 * 1000), 0x7FFFFFF0, channels=1000))
    assert wide.channels == 1000 and len(wide.samples) == 1000


def test_flac_claiming_huge_length(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, sine(440, SAMPLE_RATE, 1.0), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    word = int.from_bytes(data[18:26], "big") | (2**36 - 1)  # STREAMINFO total samples: ~50 days at 16 kHz
    data[18:26] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert probe(path).duration_s > 1e6
    raised(lambda: load_audio(path, max_duration_s=3600), AudioTooLargeError, match="max_duration_s")
    assert load_audio(path).duration_s == pytest.approx(1.0, abs=0.01)


def test_limits_checked_before_decoding(tmp_path):
    """What the header says is checked before decoding (the message gives the header's length), what it does not
    say while decoding (the message says "at least")."""
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(16000 * 10, np.int16), SAMPLE_RATE)
    error = raised(lambda: load_audio(path, max_duration_s=5), AudioTooLargeError, match="10.0 s long")
    assert "at least" not in str(error)
    raised(lambda: load_audio(path, max_bytes=1000), AudioTooLargeError, match="max_bytes")
    raised(lambda: load_audio(path.read_bytes(), max_bytes=1000), AudioTooLargeError)
    assert load_audio(path, max_duration_s=10, max_bytes=path.stat().st_size).duration_s == 10.0
    with pytest.raises(InvalidOptionError):
        load_audio(path, max_duration_s=-1)
    x, _ = sf.read(TESTDATA / "audio" / "en" / "jfk.wav", dtype="float32")
    webm = duration_less_webm(tmp_path / "recorded.webm", x)  # 11 s, and no duration in the file
    assert probe(webm).duration_s is None
    raised(lambda: load_audio(webm, max_duration_s=5), AudioTooLargeError, match="at least")
    with pytest.raises(AudioTooLargeError, match="at least"):
        list(iter_audio_blocks(webm, block_s=1, max_duration_s=5))
    assert load_audio(webm, max_duration_s=12).duration_s == pytest.approx(11.0, abs=0.05)


def test_errors_are_typed():
    assert all(issubclass(e, AudioError) for e in (AudioDecodeError, AudioNotFoundError, AudioTooLargeError,
                                                    EmptyAudioError))
    with pytest.raises(InvalidOptionError):
        load_audio(12345)  # type: ignore[arg-type]


def test_no_mlx_import(tmp_path):
    code = ("import sys, asr.audio as a; a.probe(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'av')))")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, np.int16), SAMPLE_RATE)
    out = subprocess.run([sys.executable, "-c", code, str(wav)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"  # no mlx, no torch; FFmpeg only loads when libsndfile cannot read
