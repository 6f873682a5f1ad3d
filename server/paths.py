"""Which local files `transcribe_file` may read.

Policy: an absolute path (a leading `~` and `file://` URIs are accepted too), resolved through every
symlink, must lie inside one of the configured roots and - when the client declares roots - inside
one of those as well (client roots only ever narrow). Hidden folders below a root (`~/.ssh`) are
refused unless allowed, and so are the kernel's pseudo-filesystems. The target must be a regular
file no larger than the size cap; FIFOs, devices and sockets are refused without being read.

A path outside the roots gets the same answer whether or not it exists, so the tool cannot be used
to probe the rest of the disk. What remains is the usual check-then-use gap: a local process that
swaps a checked file for a symlink between the check and the decode could redirect the read. That
needs write access inside an allowed root, which such a process already has.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


class PathRefused(Exception):
    """The path may not be read; the message tells the caller how to fix the call."""


@dataclass(frozen=True)
class CheckedFile:
    path: Path  # fully resolved
    size_bytes: int


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

    def __init__(self, roots: Sequence[Path], *, max_bytes: int, allow_hidden: bool = False):
        self.roots = [_resolve_root(Path(r)) for r in roots]
        self.max_bytes = max_bytes
        self.allow_hidden = allow_hidden
        for root in self.roots:
            if not root.is_dir():
                log.warning("allowed root %s is not an existing folder", root)

    def describe_roots(self, client_roots: Sequence[Path] | None = None) -> str:
        text = ", ".join(str(r) for r in self.roots)
        if client_roots:
            text += " (narrowed by the client to: " + ", ".join(str(r) for r in client_roots) + ")"
        return text

    def check(self, raw: str, client_roots: Sequence[Path] | None = None) -> CheckedFile:
        """Return the resolved regular file behind `raw`, or raise PathRefused."""
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
        if not self.allow_hidden:
            hidden = [part for part in real.relative_to(root).parts if part.startswith(".")]
            if hidden:
                raise PathRefused(
                    f"{raw!r} is inside a hidden folder or is a hidden file ({hidden[0]}), which this server does "
                    "not read by default. Move the audio to a normal folder, or start the server with --allow-hidden."
                )
        return self._open_checked(raw, real)

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
            text = os.path.expanduser(text)
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
        if client_roots:
            if not any(real == c or real.is_relative_to(c) for c in client_roots):
                return None
        return max(inside, key=lambda r: len(r.parts))  # the innermost root decides what is "hidden"

    def _open_checked(self, raw: str, real: Path) -> CheckedFile:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)
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
            if exc.errno == errno.ELOOP:
                raise PathRefused(f"{raw!r} changed into a symlink while being checked; try again.") from None
            raise PathRefused(f"{raw!r} cannot be opened ({os.strerror(exc.errno or 0)}).") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
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
        return CheckedFile(path=real, size_bytes=st.st_size)
