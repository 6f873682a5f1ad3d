"""The path matrix for transcribe_file: what may be read, and what each refusal says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server.paths import PathPolicy, PathRefused, roots_from_uris
from tests.test_server_support import REPO as ROOT
from tests.test_server_support import write_wav


@pytest.fixture
def tree(tmp_path: Path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    sibling = tmp_path / "root-evil"  # shares the root's prefix
    sibling.mkdir()
    write_wav(root / "a.wav", 0.5)
    write_wav(root / "sub" / "b.wav", 0.5)
    write_wav(outside / "secret.wav", 0.5)
    write_wav(sibling / "c.wav", 0.5)
    return root, outside, sibling


def policy(root: Path, **kw) -> PathPolicy:
    kw.setdefault("max_bytes", 10 * 2**20)
    return PathPolicy([root], **kw)


def refusal(p: PathPolicy, raw: str, client_roots=None) -> str:
    with pytest.raises(PathRefused) as info:
        p.check(raw, client_roots)
    return str(info.value)


def test_inside_is_allowed_and_resolved(tree):
    root, _, _ = tree
    p = policy(root)
    got = p.check(str(root / "sub" / "b.wav"))
    assert got.path == (root / "sub" / "b.wav").resolve() and got.size_bytes > 0
    assert p.check(str(root / "sub" / ".." / "a.wav")).path == (root / "a.wav").resolve()  # stays inside
    assert p.check((root / "a.wav").as_uri()).path == (root / "a.wav").resolve()  # file:// URI


@pytest.mark.parametrize("make_raw", [
    lambda root, outside, sibling: str(root / ".." / "outside" / "secret.wav"),  # traversal
    lambda root, outside, sibling: str(root) + "/../outside/secret.wav",
    lambda root, outside, sibling: str(sibling / "c.wav"),  # sibling prefix: /x/root-evil vs /x/root
    lambda root, outside, sibling: str(outside / "secret.wav"),  # plainly outside
    lambda root, outside, sibling: "/etc/passwd",
    lambda root, outside, sibling: str(outside / "missing.wav"),  # missing outside: same answer
])
def test_outside_roots_refused_with_one_message(tree, make_raw):
    root, outside, sibling = tree
    msg = refusal(policy(root), make_raw(root, outside, sibling))
    assert "does not exist or is outside the folders this server may read" in msg
    assert str(root.resolve()) in msg and "--allowed-root" in msg


def test_symlink_escape_refused_and_internal_symlink_allowed(tree):
    root, outside, _ = tree
    (root / "link.wav").symlink_to(outside / "secret.wav")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "inner.wav").symlink_to(root / "sub" / "b.wav")
    p = policy(root)
    assert "outside the folders" in refusal(p, str(root / "link.wav"))
    assert "outside the folders" in refusal(p, str(root / "dirlink" / "secret.wav"))
    assert p.check(str(root / "inner.wav")).path == (root / "sub" / "b.wav").resolve()


def test_symlinked_root_is_resolved(tree, tmp_path):
    root, _, _ = tree
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert PathPolicy([alias], max_bytes=2**20).check(str(root / "a.wav")).path == (root / "a.wav").resolve()


def test_missing_inside_says_so(tree):
    root, _, _ = tree
    msg = refusal(policy(root), str(root / "nope.wav"))
    assert "does not exist" in msg and "outside" not in msg


def test_fifo_and_devices_refused(tree):
    root, _, _ = tree
    os.mkfifo(root / "pipe.wav")
    assert "FIFO" in refusal(policy(root), str(root / "pipe.wav"))  # and it did not block on open
    (root / "null.wav").symlink_to("/dev/null")
    assert "outside the folders" in refusal(policy(root), str(root / "null.wav"))
    everything = PathPolicy([Path("/")], max_bytes=2**20, allow_hidden=True)
    for raw in ("/dev/null", "/dev/zero", "/proc/self/environ", "/sys/kernel/notes"):
        assert "outside the folders" in refusal(everything, raw)


def test_directory_hidden_relative_and_junk(tree):
    root, _, _ = tree
    p = policy(root)
    assert "is a folder" in refusal(p, str(root / "sub"))
    (root / ".ssh").mkdir()
    write_wav(root / ".ssh" / "k.wav", 0.2)
    assert "hidden" in refusal(p, str(root / ".ssh" / "k.wav"))
    assert policy(root, allow_hidden=True).check(str(root / ".ssh" / "k.wav"))
    assert "relative path" in refusal(p, "sub/b.wav")
    assert "relative path" in refusal(p, "./a.wav")
    assert "empty" in refusal(p, "")
    assert "NUL" in refusal(p, str(root / "a.wav") + "\x00.txt")
    assert "remote host" in refusal(p, "file://server/share/a.wav")


def test_symlink_loop_and_size_cap(tree):
    root, _, _ = tree
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    msg = refusal(policy(root), str(root / "loop1"))
    assert "does not exist" in msg or "outside" in msg or "symlink" in msg
    write_wav(root / "big.wav", 2.0)
    msg = refusal(PathPolicy([root], max_bytes=1000), str(root / "big.wav"))
    assert "MiB" in msg and "--max-file-mb" in msg


UNPRIVILEGED = 65534  # nobody


def test_permission_denied(tmp_path):
    """A file the server may not read: the policy and the library both say so (as root, in a child process that
    drops root's rights, since root reads every file)."""
    base = Path(tempfile.mkdtemp(dir="/tmp" if os.geteuid() == 0 else tmp_path))  # traversable by `nobody`
    try:
        os.chmod(base, 0o755)
        target = base / "locked.wav"
        write_wav(target, 0.2)
        target.chmod(0)
        code = textwrap.dedent(f"""
            import ctypes, os, sys
            from asr.audio.io import load_audio
            from asr.errors import AudioNotFoundError
            from server.paths import PathPolicy, PathRefused
            ctypes.CDLL(None)  # loaded while this process may still read the interpreter's folders
            if os.geteuid() == 0:
                os.setgid({UNPRIVILEGED}); os.setuid({UNPRIVILEGED})
            for opener in ("openat2", "walk"):
                try:
                    PathPolicy([{str(base)!r}], max_bytes=2**20, opener=opener).check({str(target)!r})
                except PathRefused as exc:
                    print(str(exc))
            try:
                load_audio({str(target)!r})
            except AudioNotFoundError as exc:
                print(str(exc))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
        lines = out.stdout.splitlines()
        assert out.returncode == 0 and len(lines) == 3, out.stderr[-2000:]
        assert "no permission to read" in lines[0] and "no permission to read" in lines[1]
        assert "permission denied" in lines[2]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_client_roots_only_narrow(tree):
    root, outside, _ = tree
    p = policy(root)
    narrowed = roots_from_uris([(root / "sub").as_uri(), "https://example.com/x", outside.as_uri()])
    assert narrowed == [(root / "sub").resolve(), outside.resolve()]
    assert p.check(str(root / "sub" / "b.wav"), narrowed)
    assert "narrowed by the client" in refusal(p, str(root / "a.wav"), narrowed)
    # a client root outside the configured ones grants nothing
    assert "outside the folders" in refusal(p, str(outside / "secret.wav"), narrowed)
    assert roots_from_uris(["file://otherhost/x"]) == []


def test_tilde_expands_to_home(monkeypatch, tree):
    root, _, _ = tree
    monkeypatch.setenv("HOME", str(root))
    assert policy(root).check("~/a.wav").path == (root / "a.wav").resolve()


@pytest.mark.parametrize("opener", ["openat2", "walk"])
def test_swapping_the_file_for_a_symlink_never_reads_outside(tree, opener):
    """A loop swaps a checked file for a symlink to a file outside the root and back, hundreds of times, while the
    policy checks and opens it: every open either is refused or reads the file inside, never the one outside."""
    root, outside, _ = tree
    inside, secret = root / "a.wav", outside / "secret.wav"
    write_wav(secret, 0.7, freq=880)  # other bytes than the file inside
    inside_bytes = inside.read_bytes()
    stash = root / "stash.wav"
    stop, pause, paused = threading.Event(), threading.Event(), threading.Event()

    def swap() -> None:
        while not stop.is_set():
            if pause.is_set():  # hold still with the file in place (every 20th check: so some checks must open it)
                paused.set()
                while pause.is_set() and not stop.is_set():
                    time.sleep(0.0005)
                paused.clear()
                continue
            os.replace(inside, stash)
            inside.symlink_to(secret)
            inside.unlink()
            os.replace(stash, inside)

    p = PathPolicy([root], max_bytes=2**20, opener=opener)
    swapper = threading.Thread(target=swap)
    swapper.start()
    opened = refused = quiet_opened = 0
    try:
        for i in range(400):
            quiet = i % 20 == 0
            if quiet:
                pause.set()
                assert paused.wait(10)
            try:
                checked = p.check(str(inside))
            except PathRefused:
                assert not quiet, "a file left in place was refused"
                refused += 1
                continue
            finally:
                if quiet:
                    pause.clear()
            with checked.file as f, f.reader() as r:
                assert r.read() == inside_bytes  # never the file outside, raced or not
            opened += 1
            quiet_opened += quiet
    finally:
        stop.set()
        pause.clear()
        swapper.join()
    assert quiet_opened == 20
    assert opened >= 20  # the other 380 checks raced the swaps: each was refused or read the file inside
