"""Audio in: a file, bytes or an array -> 16 kHz mono float32 samples, nominally in [-1, 1].

Reference: funasr/utils/load_utils.py::load_audio_text_image_video (torchaudio.load -> mean over
channels -> resample to 16 kHz; a numpy/tensor input is taken as already 16 kHz).

Decoders, tried in order:
  1. soundfile (libsndfile): WAV/W64/RF64, FLAC, OGG (Vorbis, Opus), MP3, AIFF, CAF, AU, ...
  2. PyAV (bundled FFmpeg): M4A/AAC/ALAC, MP4/MOV/3GP, WebM/MKV, WMA/ASF, AVI, AMR, AC-3, ... (first/best
     audio track). Only the audio demuxers in `_AV_DEMUXERS` are enabled, so playlists (HLS, concat)
     cannot make FFmpeg open other files.
Resampling: soxr HQ (what the official loader gets through librosa soxr_hq), streamed block by block (continuous across blocks). Channels are averaged.
Float input is not clipped, so full-scale float files may exceed [-1, 1] slightly.

Nothing here imports mlx: the server can probe and load files without touching the model.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from ..errors import (
    AudioDecodeError,
    AudioNotFoundError,
    AudioTooLargeError,
    EmptyAudioError,
    InvalidOptionError,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one 25 ms analysis frame at 16 kHz
_BLOCK_VALUES = 1 << 18  # decode at most this many values (frames x channels) per read: bounds memory
_MIN_RATE, _MAX_RATE = 1000, 1_536_000  # outside this a header is corrupt
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when the length is unknown
_PCM_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
              "ULAW": 1, "ALAW": 1}
_UNCOMPRESSED = {"WAV", "WAVEX", "W64", "RF64", "AIFF", "AU", "IRCAM", "NIST", "RAW"}
_AV_DEMUXERS = ("wav,w64,flac,ogg,mp3,aac,mov,matroska,asf,avi,amr,amrnb,amrwb,caf,aiff,au,ac3,eac3,dts,wv,"
                "ape,tta,mpc,mpc8,tak,shn,flv,mpegts,mpeg,rm,voc,loas,truehd,mlp,dsf,oma,xwma,gsm,ircam")
_AV_EXTENSIONS = {"mov": ("mp4", "m4a", "m4b", "m4v", "3gp", "3g2"), "matroska": ("mkv", "mka", "webm"),
                  "asf": ("wma", "wmv"), "mpegts": ("ts",), "mpeg": ("mpg", "mpeg"), "wv": ("wavpack",)}
SUPPORTED_FORMATS = ("WAV, FLAC, OGG (Vorbis/Opus), MP3, M4A/AAC, MP4/MOV, WebM/MKV, Opus, WMA, AIFF, CAF, "
                     "AMR, AC-3 and other FFmpeg audio")
_CONVERT_HINT = "convert it first, e.g. `ffmpeg -i INPUT -ac 1 -ar 16000 out.wav`"


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says (see `probe`); nothing is decoded."""

    path: str | None
    format: str  # container: "wav", "flac", "ogg", "mp3", "m4a", "webm", ...
    codec: str | None  # "pcm_16", "vorbis", "mpeg_layer_iii", "aac", "opus", ...
    sample_rate: int
    channels: int
    duration_s: float | None  # None when the header does not say
    size_bytes: int | None


@dataclass
class Audio:
    """Decoded audio, ready for the feature frontend."""

    samples: np.ndarray  # float32, mono, 16 kHz, C-contiguous
    sample_rate: int  # always SAMPLE_RATE
    duration_s: float
    original_sample_rate: int
    channels: int  # channels of the input (before averaging)
    format: str
    decode_s: float  # wall time spent decoding + resampling
    warnings: list[str] = field(default_factory=list)  # e.g. "file looks truncated"


# --- opening a source --------------------------------------------------------------------------------------------
class AudioFile:
    """A file opened once: every later pass (probe, VAD, block reads, decoding) reads this descriptor, never the path
    again, so the file cannot be swapped (for a symlink, say) between a check and a read.

    `AudioFile.open(path)` opens and checks a path (a regular file, not a kernel pseudo-file, within `max_bytes`);
    `AudioFile(fd, name)` takes a descriptor opened elsewhere (the MCP server opens files beneath its allowed folders
    without following symlinks) and owns it from then on. Each `reader()` is an independent binary file object with
    its own position (reads through pread), so passes never disturb each other. Close it when done (or use `with`).
    """

    def __init__(self, fd: int, name: str, *, path: str | None = None):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise AudioNotFoundError(f"{name} is a {_describe_mode(st.st_mode)}, not a regular file; save the audio "
                                     "to a regular file and pass that")
        self.fd: int | None = fd
        self.name = name  # for messages
        self.path = path
        self.size = st.st_size
        self.ext = os.path.splitext(path or "")[1].lstrip(".").lower() or None

    @classmethod
    def open(cls, source: str | os.PathLike, max_bytes: int | None = None) -> AudioFile:
        path = os.fsdecode(os.fspath(source))
        if "\x00" in path:  # os.stat would raise ValueError, not OSError
            raise AudioNotFoundError(f"{path!r} contains a NUL character, so it cannot name a file; pass a plain file "
                                     "path")
        full = os.path.expanduser(path)
        try:  # what the path names now, to refuse what is no file without opening it (the opened one is re-checked)
            mode = os.stat(full).st_mode
        except OSError as e:
            raise _stat_error(path, e) from None
        if stat.S_ISDIR(mode):
            raise AudioNotFoundError(f"{path!r} is a directory, not an audio file; pass the path of a file inside it")
        if not stat.S_ISREG(mode):  # never open FIFOs and devices: reading could block forever
            raise AudioNotFoundError(f"{path!r} is a {_describe_mode(mode)}, not a regular file; save the audio to a "
                                     "regular file and pass that")
        real = os.path.realpath(full)
        if real.startswith(("/proc/", "/sys/", "/dev/")):
            raise AudioNotFoundError(f"{path!r} is a kernel pseudo-file ({real}), not an audio file; save the audio "
                                     "to a regular file and pass that")
        try:  # O_NONBLOCK: should the path have become a FIFO meanwhile, fstat refuses it without waiting
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise _stat_error(path, e) from None
        file = cls(fd, repr(path), path=path)
        try:
            file.check_size(max_bytes)
        except BaseException:
            file.close()
            raise
        return file

    def check_size(self, max_bytes: int | None) -> None:
        if self.size == 0:
            raise EmptyAudioError(f"{self.name} is empty (0 bytes); record or export the audio again")
        if max_bytes is not None and self.size > max_bytes:
            raise AudioTooLargeError(f"{self.name} is {self.size:,} bytes, over the {max_bytes:,}-byte limit; "
                                     "trim or re-encode it (e.g. to 16 kHz mono), or raise max_bytes")

    def reader(self) -> BinaryIO:
        if self.fd is None:
            raise ValueError(f"{self.name} is closed")
        return io.BufferedReader(_PositionalReader(self.fd, self.size), buffer_size=1 << 16)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class _PositionalReader(io.RawIOBase):
    """A seekable raw reader of a descriptor through pread: its own position, the descriptor's untouched."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n


@dataclass
class _Source:
    fileobj: BinaryIO
    name: str  # for messages
    path: str | None
    size: int
    ext: str | None
    owned: AudioFile | None = None  # a file opened for this pass, closed with it


def _check_limit(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise InvalidOptionError(f"{name} must be a positive number or None, got {value!r}")


def _describe_mode(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return what
    return "special file"


def _stat_error(path: str, err: OSError) -> AudioNotFoundError:
    if isinstance(err, FileNotFoundError):
        hint = "download it first; URLs are not fetched" if "://" in path else \
            f"check the path (relative paths are resolved from {os.getcwd()!r})"
        return AudioNotFoundError(f"audio file not found: {path!r}; {hint}")
    if isinstance(err, PermissionError):
        return AudioNotFoundError(f"permission denied reading {path!r}; grant read access (e.g. chmod u+r) "
                                  "or copy the file somewhere readable")
    if err.errno == errno.ELOOP:
        return AudioNotFoundError(f"{path!r} is a symlink loop; point the link at a real audio file")
    if err.errno == errno.ENOTDIR:
        return AudioNotFoundError(f"audio file not found: {path!r} (a parent is not a directory); check the path")
    return AudioNotFoundError(f"cannot access {path!r}: {err.strerror or err}; check the path and permissions")


Source = str | os.PathLike | bytes | AudioFile


def _open_source(source: Source, max_bytes: int | None) -> _Source:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise EmptyAudioError("the audio bytes are empty (0 bytes); send the file's contents")
        if max_bytes is not None and len(data) > max_bytes:
            raise AudioTooLargeError(f"the audio is {len(data):,} bytes, over the {max_bytes:,}-byte limit; "
                                     "trim or re-encode it (e.g. to 16 kHz mono), or raise max_bytes")
        return _Source(io.BytesIO(data), "the audio bytes", None, len(data), None)
    if isinstance(source, AudioFile):
        source.check_size(max_bytes)
        return _Source(source.reader(), source.name, source.path, source.size, source.ext)
    if isinstance(source, (str, os.PathLike)):
        file = AudioFile.open(source, max_bytes)
        return _Source(file.reader(), file.name, file.path, file.size, file.ext, owned=file)
    raise InvalidOptionError(f"audio must be a path, bytes, an AudioFile or a numpy array, got {type(source).__name__}")


def _undecodable(src: _Source, detail: str) -> AudioDecodeError:
    return AudioDecodeError(f"cannot decode {src.name}: {detail}. Supported: {SUPPORTED_FORMATS}; "
                            f"if this is audio in another format, {_CONVERT_HINT}")


# --- decoders: each yields (sample_rate, mono float32 block) at the native rate ----------------
def _to_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1); float kept as is."""
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind == "f":
        return x.astype(np.float32, copy=False)
    if kind == "u" and size == 1:
        return (x.astype(np.float32) - 128.0) / 128.0
    if kind == "i" and size in (1, 2, 4, 8):
        return (x.astype(np.float64 if size > 2 else np.float32) / float(2 ** (8 * size - 1))).astype(np.float32)
    raise AudioDecodeError(f"unsupported sample type {x.dtype}; pass float32/float64, int8/16/32/64 or uint8 samples")


def _mono(x: np.ndarray, axis: int) -> np.ndarray:
    x = x.mean(axis=axis, dtype=np.float32) if x.shape[axis] > 1 else x.take(0, axis=axis)
    return np.ascontiguousarray(x, dtype=np.float32)


class _SoundfileReader:
    def __init__(self, src: _Source, warnings: list[str]):
        claimed = _riff_data_size(src.fileobj)  # before libsndfile owns the file position
        self.snd = sf.SoundFile(src.fileobj)  # raises if libsndfile does not know the data
        snd, self.src = self.snd, src
        if not (_MIN_RATE <= snd.samplerate <= _MAX_RATE and snd.channels >= 1):
            snd.close()
            raise _undecodable(src, f"corrupt header ({snd.samplerate} Hz, {snd.channels} channels)")
        frames = snd.frames if 0 <= snd.frames < _UNKNOWN_FRAMES else None
        width = _PCM_BYTES.get(snd.subtype) if snd.format in _UNCOMPRESSED else None
        if width is not None:  # the file size bounds the length, whatever the header claims
            fits = src.size // (width * snd.channels)
            if claimed is not None and claimed // (width * snd.channels) > fits:
                _warn(warnings, f"{src.name}: header claims {claimed // (width * snd.channels) / snd.samplerate:.2f}"
                                f" s of audio but the file holds at most {fits / snd.samplerate:.2f} s; "
                                "it looks truncated, decoding what is there")
            frames = fits if frames is None else min(frames, fits)
        self.frames = frames
        self.info = AudioInfo(src.path, snd.format.lower(), snd.subtype.lower(), snd.samplerate, snd.channels,
                              None if frames is None else frames / snd.samplerate, src.size)

    def blocks(self, warnings: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        snd, n = self.snd, 0
        per_read = max(1, _BLOCK_VALUES // snd.channels)
        while True:
            try:
                data = snd.read(per_read, dtype="float32", always_2d=True)
            except (RuntimeError, ValueError, OSError) as e:
                if n == 0:
                    raise _NoDataYet(e) from e
                _warn(warnings, f"{self.src.name}: decoding stopped after {n / snd.samplerate:.2f} s ({e}); "
                                "the file looks truncated or corrupt, the rest is ignored")
                return
            if not len(data):
                break
            n += len(data)
            yield snd.samplerate, _mono(data, axis=1)
        if self.frames and n < 0.99 * self.frames - snd.samplerate * 0.1:
            _warn(warnings, f"{self.src.name}: header promises {self.frames / snd.samplerate:.2f} s but only "
                            f"{n / snd.samplerate:.2f} s decoded; the file looks truncated")

    def close(self) -> None:
        self.snd.close()


class _PyAVReader:
    def __init__(self, src: _Source, sndfile_error: str | None = None):
        import av  # lazy: FFmpeg is only needed for formats libsndfile lacks

        self.av, self.src = av, src
        src.fileobj.seek(0)
        try:
            self.container = av.open(src.fileobj, mode="r", options={"format_whitelist": _AV_DEMUXERS})
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
            raise _undecodable(src, f"not a recognised audio or video file ({_av_reason(e)})") from None
        container = self.container
        if not container.streams.audio:
            container.close()
            raise _undecodable(src, f"the {container.format.name} file has no audio track")
        self.stream = stream = container.streams.best("audio") or container.streams.audio[0]
        cc = stream.codec_context
        if cc is None:  # FFmpeg found an audio track but has no decoder for its codec
            container.close()
            raise _undecodable(src, f"the {container.format.name} file's audio codec is unknown or unsupported")
        rate, channels = cc.sample_rate or 0, cc.layout.nb_channels if cc.layout else 0
        if not (_MIN_RATE <= rate <= _MAX_RATE and channels >= 1):
            container.close()
            why = f" (libsndfile: {sndfile_error})" if sndfile_error else ""
            counted = f"{channels} channels" if channels >= 1 else "a channel count it cannot use"
            raise _undecodable(src, f"the audio track has no usable header ({rate} Hz, {counted}){why}")
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6  # AV_TIME_BASE
        names = container.format.name.split(",")
        known = set(names).union(*(_AV_EXTENSIONS.get(n, ()) for n in names))
        fmt = src.ext if src.ext in known else names[0]  # "m4a" reads better than "mov" when we know it
        self.info = AudioInfo(src.path, fmt, cc.name, rate, channels, duration, src.size)

    def blocks(self, warnings: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        av, acc, have, rate, total, bad = self.av, [], 0, None, 0.0, 0
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.FFmpegError, OSError, ValueError) as e:  # demuxer gave up: truncated container
                if not total and not acc:
                    raise _undecodable(self.src, f"corrupt or truncated ({_av_reason(e)})") from None
                _warn(warnings, f"{self.src.name}: decoding stopped after {total:.2f} s ({_av_reason(e)}); "
                                "the file looks truncated or corrupt, the rest is ignored")
                break
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError) as e:  # one bad packet: skip it, as ffmpeg does
                bad += 1
                log.debug("%s: skipping undecodable packet: %s", self.src.name, _av_reason(e))
                continue
            for frame in frames:
                if rate is not None and frame.sample_rate != rate and acc:
                    yield rate, np.concatenate(acc)
                    acc, have = [], 0
                rate = frame.sample_rate
                x = _frame_to_mono(frame)
                acc.append(x)
                have += len(x)
                total += len(x) / rate
                if have >= _BLOCK_VALUES // 4:
                    yield rate, np.concatenate(acc)
                    acc, have = [], 0
        if acc:
            yield rate, np.concatenate(acc)
        if bad:
            if not total:
                raise _undecodable(self.src, f"none of the {bad} audio packets could be decoded "
                                             f"(codec {self.info.codec!r}; corrupt data?)")
            _warn(warnings, f"{self.src.name}: skipped {bad} undecodable audio packet(s); "
                            "the file looks truncated or corrupt")

    def close(self) -> None:
        self.container.close()


def _riff_data_size(f: BinaryIO) -> int | None:
    """Byte size the RIFF/WAVE 'data' chunk claims; None when not found or left open (0, 0xFFFFFFFF)."""
    f.seek(0)
    head = f.read(1 << 16)
    f.seek(0)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        size = int.from_bytes(head[pos + 4:pos + 8], "little")
        if head[pos:pos + 4] == b"data":
            return size if 0 < size < 0xFFFFFFFF else None
        pos += 8 + size + (size & 1)
    return None


class _NoDataYet(Exception):
    """libsndfile opened the data but could not decode its first block: let FFmpeg try."""


def _av_reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _frame_to_mono(frame) -> np.ndarray:
    x = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: (1, samples * channels), interleaved
        x = x.reshape(-1, channels).T
    return _mono(_to_float(x), axis=0)


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


class _Decoding:
    """An open source plus the first decoder that can read it (libsndfile, else FFmpeg)."""

    def __init__(self, source, max_bytes: int | None):
        self.warnings: list[str] = []
        self.src = _open_source(source, max_bytes)
        self.reader: _SoundfileReader | _PyAVReader | None = None
        self._first: list[tuple[int, np.ndarray]] = []
        self._rest: Iterator[tuple[int, np.ndarray]] = iter(())

    def open(self, prime: bool = True) -> AudioInfo:
        """Pick a decoder. With `prime`, decode the first block too, so that data libsndfile
        recognises but cannot decode still falls through to FFmpeg."""
        sndfile_error = None
        try:
            reader = _SoundfileReader(self.src, self.warnings)
        except AudioDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - libsndfile does not know this data: FFmpeg's turn
            log.debug("%s: libsndfile cannot open it (%s); trying FFmpeg", self.src.name, e)
            sndfile_error = str(e).rpartition(": ")[2].rstrip(".") or None  # "Error opening <name>: <reason>"
        else:
            self.reader = reader
            if not prime:
                return reader.info
            blocks = reader.blocks(self.warnings)
            try:
                self._first = [next(blocks)]
            except StopIteration:
                pass
            except _NoDataYet as e:
                log.debug("%s: libsndfile cannot decode it (%s); trying FFmpeg", self.src.name, e.__cause__)
                reader.close()
                self.reader = None
            if self.reader is not None:
                self._rest = blocks
                return reader.info
        self.reader = _PyAVReader(self.src, sndfile_error)
        self._rest = self.reader.blocks(self.warnings)
        return self.reader.info

    def blocks(self, max_duration_s: float | None) -> Iterator[tuple[int, np.ndarray]]:
        """Native-rate mono blocks, checked for NaN/Inf and the duration limit."""
        seconds = 0.0
        slack = 0 if max_duration_s is None else max(1.0, 0.01 * max_duration_s)  # codec padding
        first, self._first = self._first, []
        for rate, x in _chain(first, self._rest):
            if not np.isfinite(x).all():
                raise AudioDecodeError(f"{self.src.name} contains NaN or infinite samples (corrupt float data); "
                                       "re-export the audio")
            seconds += len(x) / rate
            if max_duration_s is not None and seconds > max_duration_s + slack:
                raise _too_long(self.src.name, seconds, max_duration_s, "at least ")
            yield rate, x

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.src.fileobj.close()
        if self.src.owned is not None:
            self.src.owned.close()


def _chain(first: list, rest: Iterator) -> Iterator:
    while first:
        yield first.pop(0)
    yield from rest


def _too_long(name: str, seconds: float, limit: float, qualifier: str = "") -> AudioTooLargeError:
    return AudioTooLargeError(f"{name} is {qualifier}{seconds:.1f} s long, over the {limit:g} s limit; "
                              "split or trim it (e.g. `ffmpeg -i IN -t 600 -c copy OUT`), "
                              "stream it with iter_audio_blocks, or raise max_duration_s")


def check_duration(info: AudioInfo, name: str, max_duration_s: float | None) -> None:
    """AudioTooLargeError where the header says the audio is longer than max_duration_s."""
    if max_duration_s is not None and info.duration_s is not None and info.duration_s > max_duration_s:
        raise _too_long(name, info.duration_s, max_duration_s)


def _resample(blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[np.ndarray]:
    """Native-rate blocks -> 16 kHz blocks through one continuous soxr stream per input rate."""
    stream, rate = None, None
    for r, x in blocks:
        if r != rate and stream is not None:
            tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail
            stream = None
        rate = r
        if r == SAMPLE_RATE:
            if len(x):
                yield x
            continue
        if stream is None:
            stream = soxr.ResampleStream(r, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        y = stream.resample_chunk(x, last=False)
        if len(y):
            yield y
    if stream is not None:
        tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(tail):
            yield tail


def _empty(name: str, n: int) -> EmptyAudioError:
    what = "no samples" if n == 0 else f"only {n} samples ({n / SAMPLE_RATE * 1000:.1f} ms at 16 kHz)"
    return EmptyAudioError(f"{name} has {what}; at least {MIN_SAMPLES} samples (25 ms) are needed, "
                           "so pass a longer recording")


# --- public API --------------------------------------------------------------------------------
def probe(source: Source) -> AudioInfo:
    """Read a file's header only: format, codec, rate, channels, duration (None if unknown)."""
    dec = _Decoding(source, None)
    try:
        return dec.open(prime=False)
    finally:
        dec.close()


STREAM_ABOVE_S = 600.0  # files longer than this, or of unknown length, are read in blocks, never decoded whole


def decode_or_stream(file: AudioFile, max_duration_s: float | None = None) -> Audio | AudioFile:
    """A file's audio decoded in memory, or the file itself where it is to be read in blocks: its header gives no
    length or one over STREAM_ABOVE_S, or it holds more audio than the header said (decoding stops at
    STREAM_ABOVE_S, so memory stays bounded either way). `max_duration_s` is checked from the header (and while
    reading, by whoever streams it)."""
    info = probe(file)
    if info.duration_s is None or info.duration_s > STREAM_ABOVE_S:
        check_duration(info, file.name, max_duration_s)
        return file
    cap = STREAM_ABOVE_S if max_duration_s is None else min(max_duration_s, STREAM_ABOVE_S)
    try:
        return load_audio(file, max_duration_s=cap)
    except AudioTooLargeError:
        if max_duration_s is not None and max_duration_s <= STREAM_ABOVE_S:
            raise
        return file  # the header understated the length


def load_audio(source: Source | np.ndarray, sample_rate: int | None = None, *,
               max_bytes: int | None = None, max_duration_s: float | None = None) -> Audio:
    """Decode `source` to 16 kHz mono float32.

    `source` is a path, an AudioFile, the bytes of an encoded file, or a numpy array of samples. For an array,
    `sample_rate` is its rate and defaults to 16000 (as in the official code); integer arrays are
    scaled to [-1, 1), 2-D arrays may be (samples, channels) or (channels, samples) with at most 8
    channels, and a 16 kHz float32 mono array is returned without a copy. For files and bytes the
    rate comes from the header and `sample_rate` is ignored.

    `max_bytes` and `max_duration_s` are checked on the file size and the header before decoding
    (and the duration again while decoding). Raises AudioNotFoundError, AudioDecodeError,
    EmptyAudioError or AudioTooLargeError, each naming the problem and the fix.
    """
    _check_limit("max_bytes", max_bytes)
    _check_limit("max_duration_s", max_duration_s)
    t0 = time.perf_counter()
    if isinstance(source, np.ndarray):
        return _load_array(source, sample_rate, max_bytes, max_duration_s, t0)
    dec = _Decoding(source, max_bytes)
    try:
        info = dec.open()
        check_duration(info, dec.src.name, max_duration_s)
        if sample_rate is not None and sample_rate != info.sample_rate:
            log.warning("%s: sample_rate=%s ignored; the file's header says %d Hz",
                        dec.src.name, sample_rate, info.sample_rate)
        parts = list(_resample(dec.blocks(max_duration_s)))
    finally:
        dec.close()
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if len(samples) < MIN_SAMPLES:
        raise _empty(dec.src.name, len(samples))
    return Audio(samples, SAMPLE_RATE, len(samples) / SAMPLE_RATE, info.sample_rate, info.channels,
                 info.format, time.perf_counter() - t0, dec.warnings)


def iter_audio_blocks(source: Source, block_s: float = 60.0, *,
                      max_duration_s: float | None = None) -> Iterator[np.ndarray]:
    """Yield consecutive 16 kHz mono float32 blocks of `block_s` seconds (the last one shorter).

    Memory stays bounded by the block size, whatever the file's length; resampling is continuous,
    so the concatenated blocks equal `load_audio(source).samples`. The source is opened and its
    header checked when this is called (errors surface here, not at the first `next`).
    """
    _check_limit("block_s", block_s)
    _check_limit("max_duration_s", max_duration_s)
    if isinstance(source, np.ndarray):
        raise InvalidOptionError("iter_audio_blocks reads files or bytes; for an array, call load_audio and slice it")
    block = max(1, round(block_s * SAMPLE_RATE))
    dec = _Decoding(source, None)
    try:
        info = dec.open()
        check_duration(info, dec.src.name, max_duration_s)
    except BaseException:
        dec.close()
        raise
    return _rebuffer(dec, block, max_duration_s)


def _rebuffer(dec: _Decoding, block: int, max_duration_s: float | None) -> Iterator[np.ndarray]:
    try:
        buf: list[np.ndarray] = []
        have = done = 0
        for piece in _resample(dec.blocks(max_duration_s)):
            buf.append(piece)
            have += len(piece)
            if have < block:
                continue
            joined = np.concatenate(buf)
            cut = len(joined) - len(joined) % block
            for i in range(0, cut, block):
                yield joined[i:i + block].copy()
            done += cut
            buf = [joined[cut:].copy()] if cut < len(joined) else []
            have = len(joined) - cut
        if done + have < MIN_SAMPLES:
            raise _empty(dec.src.name, done + have)
        if have:
            yield np.concatenate(buf)
    finally:
        dec.close()


def _load_array(x: np.ndarray, sample_rate: int | None, max_bytes: int | None,
                max_duration_s: float | None, t0: float) -> Audio:
    rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if isinstance(rate, bool) or not float(rate).is_integer() or not _MIN_RATE <= rate <= _MAX_RATE:
        raise InvalidOptionError(f"sample_rate must be an integer between {_MIN_RATE} and {_MAX_RATE} Hz, "
                                 f"got {sample_rate!r}")
    rate = int(rate)
    if x.ndim == 1:
        channels = 1
    elif x.ndim == 2 and x.shape[1] <= 8 and x.shape[0] > x.shape[1]:
        channels, x = x.shape[1], x.T
    elif x.ndim == 2 and x.shape[0] <= 8 and x.shape[1] > x.shape[0]:
        channels = x.shape[0]
    else:
        raise AudioDecodeError(f"cannot tell samples from channels in an array of shape {x.shape}; pass a 1-D "
                               "array, or 2-D (samples, channels) / (channels, samples) with at most 8 channels")
    if max_bytes is not None and x.nbytes > max_bytes:
        raise AudioTooLargeError(f"the audio array is {x.nbytes:,} bytes, over the {max_bytes:,}-byte limit; "
                                 "trim it or raise max_bytes")
    if max_duration_s is not None and x.shape[-1] / rate > max_duration_s:
        raise _too_long("the audio array", x.shape[-1] / rate, max_duration_s)
    y = _to_float(x)
    y = _mono(y, axis=0) if y.ndim == 2 else np.ascontiguousarray(y)
    if not np.isfinite(y).all():
        raise AudioDecodeError("the audio array contains NaN or infinite samples; clean or re-create it")
    if rate != SAMPLE_RATE and len(y):
        y = np.ascontiguousarray(soxr.resample(y, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)
    if len(y) < MIN_SAMPLES:
        raise _empty("the audio array", len(y))
    return Audio(y, SAMPLE_RATE, len(y) / SAMPLE_RATE, rate, channels, "array", time.perf_counter() - t0)

