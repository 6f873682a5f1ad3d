"""Which local files `transcribe_file` may read, and the one open of each.

Policy: an absolute path (a leading `~` and `file://` URIs are accepted too), resolved through every symlink, must
lie inside one of the configured roots and - when the client declares roots - inside one of those as well (client
roots only ever narrow). Hidden folders below a root (`~/.ssh`) are refused unless allowed, and so are the kernel's
pseudo-filesystems. The target must be a regular file no larger than the size cap; FIFOs, devices and sockets are
refused without being read. A path outside the roots gets the same answer whether or not it exists, so the tool
cannot be used to probe the rest of the disk.

The resolved path is then opened once, from the root's directory, without following a symlink in any component
below the root (Linux: openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; elsewhere, or on older kernels, one
component at a time with O_NOFOLLOW), the opened descriptor is checked (a regular file, its size, where it really
is), and that descriptor - never the path - is what every later pass reads (asr.audio.io.AudioFile). Someone who can
write inside an allowed folder cannot swap the file for a symlink to a file outside: swapped before the open, the
open refuses it; swapped after, the server keeps reading the file it checked.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from asr.audio.io import AudioFile

log = logging.getLogger(__name__)

_PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


class PathRefused(Exception):
    """The path may not be read; the message tells the caller how to fix the call."""


@dataclass(frozen=True)
class CheckedFile:
    path: Path  # fully resolved: where the opened file is
    size_bytes: int
    file: AudioFile  # the one open of it; the caller closes it


@dataclass(frozen=True)
class CheckedDir:
    path: Path  # fully resolved
    fd: int  # the one open of it (O_DIRECTORY); the caller closes it


_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added after the syscall tables were unified)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, rel: str) -> int:
    """openat2(dir_fd, rel) refusing any symlink and any escape from dir_fd; OSError(ENOSYS) where the kernel (< 5.6)
    or the platform has no openat2."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "openat2 is Linux-only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(_FILE_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), rel.encode(), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _walk(dir_fd: int, parts: Sequence[str]) -> int:
    """Open dir_fd/parts one component at a time, each with O_NOFOLLOW: a symlink anywhere fails with ELOOP (or
    ENOTDIR for a directory component on some systems)."""
    opened = []
    try:
        cur = dir_fd
        for part in parts[:-1]:
            cur = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
            opened.append(cur)
        return os.open(parts[-1], _FILE_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
    finally:
        for fd in opened:
            os.close(fd)


def open_beneath(root: Path, parts: Sequence[str], opener: Literal["auto", "openat2", "walk"] = "auto") -> int:
    """A descriptor of root/parts opened without following a symlink in any component below `root`."""
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        if opener in ("auto", "openat2"):
            try:
                return _openat2(root_fd, os.path.join(*parts))
            except OSError as exc:
                if exc.errno != errno.ENOSYS or opener == "openat2":
                    raise
        return _walk(root_fd, parts)
    finally:
        os.close(root_fd)


def _opened_path(fd: int) -> Path | None:
    """Where an opened descriptor really is (Linux /proc/self/fd, macOS F_GETPATH), or None where unknown."""
    try:
        if sys.platform.startswith("linux"):
            return Path(os.readlink(f"/proc/self/fd/{fd}"))
        if sys.platform == "darwin":
            import fcntl

            buf = fcntl.fcntl(fd, 50, b"\0" * 1024)  # F_GETPATH
            return Path(buf.split(b"\0", 1)[0].decode())
    except (OSError, ValueError):
        return None
    return None


def _resolve_root(root: Path) -> Path:
    try:
        return root.expanduser().resolve(strict=False)
    except (OSError, RuntimeError):
        return root


def roots_from_uris(uris: Iterable[str]) -> list[Path]:
    """Local folders from client-declared root URIs (`file://` only; others are ignored)."""
    out = []
    for uri in uris:
        parts = urlsplit(str(uri))
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            continue
        path = Path(unquote(parts.path))
        if path.is_absolute():
            out.append(_resolve_root(path))
    return out


class PathPolicy:
    """Checks caller-supplied paths against the allowed roots."""

    def __init__(self, roots: Sequence[Path], *, max_bytes: int, allow_hidden: bool = False,
                 opener: Literal["auto", "openat2", "walk"] = "auto"):
        """opener: how files are opened beneath a root ("auto": openat2 where the kernel has it, else the walk)."""
        self.roots = [_resolve_root(Path(r)) for r in roots]
        self.max_bytes = max_bytes
        self.allow_hidden = allow_hidden
        self.opener = opener
        for root in self.roots:
            if not root.is_dir():
                log.warning("allowed root %s is not an existing folder", root)

    def describe_roots(self, client_roots: Sequence[Path] | None = None) -> str:
        text = ", ".join(str(r) for r in self.roots)
        if client_roots:
            text += " (narrowed by the client to: " + ", ".join(str(r) for r in client_roots) + ")"
        elif client_roots is not None:
            text += " (but the client shares no local folder with this server: it declared roots and listed no "
            "file:// one, so no file may be read until the user adds a folder in the client)"
        return text

    def check(self, raw: str, client_roots: Sequence[Path] | None = None) -> CheckedFile:
        """Open the regular file behind `raw` (see the module docstring) and return it, or raise PathRefused.
        client_roots: the folders the client declared (they only narrow); an empty list allows nothing."""
        path = self._parse(raw)
        outside = PathRefused(
            f"No audio file may be read at {raw!r}: it does not exist or is outside the folders this server may "
            f"read ({self.describe_roots(client_roots)}). Pass the absolute path of an existing file inside one of "
            "them; to allow another folder, the user adds it with --allowed-root (FUNASR_NANO_MCP_ALLOWED_ROOTS)."
        )
        try:
            real = Path(os.path.realpath(path))  # non-strict: resolves every symlink that exists
        except (OSError, RuntimeError, ValueError):
            raise outside from None
        root = self._root_of(real, client_roots)
        if root is None:
            raise outside
        if any(real == p or real.is_relative_to(p) for p in _PSEUDO_FS):
            raise outside
        parts = real.relative_to(root).parts
        if not self.allow_hidden:
            hidden = [part for part in parts if part.startswith(".")]
            if hidden:
                raise PathRefused(
                    f"{raw!r} is inside a hidden folder or is a hidden file ({hidden[0]}), which this server does "
                    "not read by default. Move the audio to a normal folder, or start the server with --allow-hidden."
                )
        if not parts:
            raise PathRefused(f"{raw!r} is a folder. Pass the path of an audio file inside it.")
        return self._open_checked(raw, root, real, parts)

    def check_dir(self, raw: str, client_roots: Sequence[Path] | None = None) -> CheckedDir:
        """Open the folder behind `raw` (inside the allowed roots, no symlink followed below its root) for writing
        into it through its descriptor, or raise PathRefused."""
        path = self._parse(raw)
        outside = PathRefused(
            f"No transcript may be written to {raw!r}: it does not exist or is outside the folders this server may "
            f"use ({self.describe_roots(client_roots)}). Pass an existing folder inside one of them."
        )
        try:
            real = Path(os.path.realpath(path))
        except (OSError, RuntimeError, ValueError):
            raise outside from None
        root = self._root_of(real, client_roots)
        if root is None or any(real == p or real.is_relative_to(p) for p in _PSEUDO_FS):
            raise outside
        parts = real.relative_to(root).parts
        if not self.allow_hidden and any(part.startswith(".") for part in parts):
            raise PathRefused(f"{raw!r} is a hidden folder or inside one, which this server does not use by default; "
                              "pick a normal folder, or start the server with --allow-hidden.")
        try:
            fd = os.open(root, _DIR_FLAGS) if not parts else open_beneath(root, parts, self.opener)
        except FileNotFoundError:
            raise PathRefused(f"The folder {raw!r} does not exist; create it first or pass an existing one.") from None
        except PermissionError:
            raise PathRefused(f"The server has no permission to open the folder {raw!r}.") from None
        except OSError as exc:
            raise PathRefused(f"The folder {raw!r} cannot be opened ({os.strerror(exc.errno or 0)}); symlinks are "
                              "not followed. Pass the folder's own path.") from None
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathRefused(f"{raw!r} is a file, not a folder. Pass the folder to write the transcript files into.")
        return CheckedDir(path=real, fd=fd)

    def _parse(self, raw: str) -> Path:
        if not isinstance(raw, str) or not raw.strip():
            raise PathRefused("The path is empty. Pass the absolute path of an audio file, e.g. /Users/me/Music/talk.mp3.")
        if "\x00" in raw:
            raise PathRefused("The path contains a NUL character. Pass a plain absolute file path.")
        text = raw
        if text.startswith("file://"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise PathRefused(f"{raw!r} names a remote host; only local file paths are accepted here.")
            text = unquote(parts.path)
        if text.startswith("~"):
            expanded = os.path.expanduser(text)
            if expanded == text:  # ~name of a user this machine does not know
                user = text[1:].split("/", 1)[0]
                raise PathRefused(f"{raw!r} names the home folder of {user!r}, a user this computer does not have. "
                                  "Pass an absolute path (starting with '/').")
            text = expanded
        path = Path(text)
        if not path.is_absolute():
            raise PathRefused(
                f"{raw!r} is a relative path. Pass an absolute path (starting with '/'), e.g. "
                f"{self.roots[0] / 'recording.wav'}; the server does not guess a working folder."
            )
        return path

    def _root_of(self, real: Path, client_roots: Sequence[Path] | None) -> Path | None:
        inside = [r for r in self.roots if real == r or real.is_relative_to(r)]
        if not inside:
            return None
        if client_roots is not None:
            if not any(real == c or real.is_relative_to(c) for c in client_roots):
                return None
        return max(inside, key=lambda r: len(r.parts))  # the innermost root decides what is "hidden"

    def _open_checked(self, raw: str, root: Path, real: Path, parts: tuple[str, ...]) -> CheckedFile:
        try:
            fd = open_beneath(root, parts, self.opener)
        except FileNotFoundError:
            raise PathRefused(
                f"{raw!r} does not exist. Check the spelling and pass the absolute path of an existing audio file."
            ) from None
        except IsADirectoryError:
            raise PathRefused(f"{raw!r} is a folder. Pass the path of an audio file inside it.") from None
        except PermissionError:
            raise PathRefused(
                f"The server has no permission to read {raw!r}. Ask the user to make it readable "
                "(on macOS, grant the app running the server access to that folder)."
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                if os.path.islink(real):  # resolving stopped at a link: a loop, or a link to nothing
                    raise PathRefused(f"{raw!r} is a symlink loop or a broken symlink; point it at a real audio "
                                      "file, or pass the file's own path.") from None
                raise PathRefused(f"{raw!r} changed into a symlink while it was being opened; symlinks are not "
                                  "followed once a path is checked. Pass the file's own path.") from None
            raise PathRefused(f"{raw!r} cannot be opened ({os.strerror(exc.errno or 0)}).") from None
        try:
            checked = self._inspect(raw, fd, real)
        except BaseException:
            os.close(fd)
            raise
        return checked

    def _inspect(self, raw: str, fd: int, real: Path) -> CheckedFile:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PathRefused(f"{raw!r} is a folder. Pass the path of an audio file inside it.")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise PathRefused(f"{raw!r} is {kind}, not a regular file. Pass the path of an audio file.")
        if st.st_size > self.max_bytes:
            raise PathRefused(
                f"{raw!r} is {st.st_size / 2**20:.1f} MiB, over this server's {self.max_bytes / 2**20:.0f} MiB limit "
                "(--max-file-mb). Split or re-encode it (e.g. `ffmpeg -i in -ac 1 -ar 16000 -c:a flac out.flac`)."
            )
        where = _opened_path(fd)
        if where is not None and where != real:  # cannot happen through open_beneath; checked all the same
            raise PathRefused(f"{raw!r} changed while it was being opened; try again.")
        return CheckedFile(path=real, size_bytes=st.st_size, file=AudioFile(fd, repr(raw), path=str(real)))
