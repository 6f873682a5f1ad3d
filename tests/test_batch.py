"""`funasr-nano batch` / asr.batch: outputs per input, resume, failures that never stop the run, manifests, files
decoded together, and a run killed midway that a rerun completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asr.batch import FAILURES_FILE, STATE_FILE, BatchOptions, discover, load_state, run_batch
from asr.errors import InvalidOptionError

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO / "tests" / "data" / "audio"
TOKENS = 6


class Counting:
    """The real model, recording how many inputs each transcribe_many call got (a model-level seam)."""

    def __init__(self, model):
        self.model = model
        self.groups: list[int] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def transcribe_many(self, audios, **kwargs):
        self.groups.append(len(audios))
        return self.model.transcribe_many(audios, **kwargs)


@pytest.fixture
def archive(tmp_path) -> Path:
    """A folder of short clips in two subfolders, a hidden file, a non-audio file and a corrupt 'mp3'."""
    root = tmp_path / "archive"
    (root / "en").mkdir(parents=True)
    (root / "zh").mkdir()
    for p in sorted((AUDIO / "en").glob("*.wav"))[:3]:
        shutil.copy(p, root / "en" / p.name)
    for p in sorted((AUDIO / "zh").glob("*.wav"))[:2]:
        shutil.copy(p, root / "zh" / p.name)
    (root / "zh" / "notes.txt").write_text("not audio")
    (root / ".hidden.wav").write_bytes((AUDIO / "en" / "jfk.wav").read_bytes())
    (root / "en" / "broken.mp3").write_bytes(b"ID3 this is not an mp3" * 20)
    return root


def test_a_folder_becomes_one_output_per_input(tiny_model, archive, tmp_path):
    out = tmp_path / "out"
    model = Counting(tiny_model)
    items = discover([archive])
    assert [str(i.rel) for i in items] == ["en/broken", "en/example_en", "en/fleurs_en_us_test_001", "en/jfk",
                                           "zh/aishell1_BAC009S0724W0121", "zh/example_zh"]
    summary = run_batch(model, items, out, BatchOptions(formats=("txt", "srt", "json"), max_new_tokens=TOKENS,
                                                         progress=False))
    assert (summary.files, summary.done, summary.failed, summary.skipped) == (6, 5, 1, 0)
    assert model.groups and max(model.groups) > 1  # files were decoded together
    for item in items[1:]:
        alone = tiny_model.transcribe(str(item.path), max_new_tokens=TOKENS)
        assert (out / f"{item.rel}.txt").read_text(encoding="utf-8").strip() == alone.text.strip()
        assert json.loads((out / f"{item.rel}.json").read_text())["token_ids"] == alone.token_ids
        assert (out / f"{item.rel}.srt").read_text().startswith("1\n00:00:00,000 --> ")
    failure = json.loads((out / FAILURES_FILE).read_text())
    assert failure["input"].endswith("broken.mp3") and failure["error"] == "AudioDecodeError"
    assert "ffmpeg" in failure["message"]
    assert not (out / "en" / "broken.txt").exists() and not list(out.rglob("*.tmp"))
    assert summary.audio_s > 30 and summary.rtfx > 0 and "5 transcribed" in summary.line()


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(tiny_model, archive, tmp_path):
    out = tmp_path / "out"
    opts = BatchOptions(formats=("txt",), max_new_tokens=TOKENS, progress=False)
    items = [i for i in discover([archive]) if i.path.suffix == ".wav"]
    first = run_batch(tiny_model, items, out, opts)
    assert first.done == 5
    again = run_batch(tiny_model, items, out, opts)
    assert (again.done, again.skipped) == (0, 5)
    touched = items[2].path
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # a newer modification time
    (out / f"{items[3].rel}.txt").unlink()  # a lost output
    third = run_batch(tiny_model, items, out, opts)
    assert (third.done, third.skipped) == (2, 3)
    more = run_batch(tiny_model, items, out, BatchOptions(formats=("txt", "vtt"), max_new_tokens=TOKENS,
                                                          progress=False))
    assert more.done == 5  # a new format is missing everywhere
    assert len(load_state(out)) == 5


def test_manifests_carry_per_file_language_and_hotwords(tiny_model, tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(AUDIO / "en" / "jfk.wav", tmp_path / "m" / "a.wav")
    shutil.copy(AUDIO / "zh" / "example_zh.wav", tmp_path / "m" / "b.wav")
    jsonl = tmp_path / "m" / "list.jsonl"
    jsonl.write_text('{"path": "a.wav", "language": "en", "hotwords": ["Kennedy"]}\n'
                     '{"path": "%s", "language": "zh"}\n\n' % (tmp_path / "m" / "b.wav"))
    csv_file = tmp_path / "m" / "list.csv"
    csv_file.write_text("path,language,hotwords\na.wav,ja,\"x, y\"\n")
    items = discover([], manifest=jsonl)
    assert [(i.rel.name, i.language, i.hotwords) for i in items] == [("a", "en", ("Kennedy",)), ("b", "zh", ())]
    assert [(i.language, i.hotwords) for i in discover([], manifest=csv_file)] == [("ja", ("x", "y"))]
    out = tmp_path / "out"
    run_batch(tiny_model, items, out, BatchOptions(formats=("json",), max_new_tokens=TOKENS, progress=False))
    a = json.loads((out / "a.json").read_text())
    want = tiny_model.transcribe(str(AUDIO / "en" / "jfk.wav"), language="en", hotwords=["Kennedy"],
                                 max_new_tokens=TOKENS)
    assert a["language"] == "en" and a["language_source"] == "requested" and a["token_ids"] == want.token_ids
    assert json.loads((out / "b.json").read_text())["language"] == "zh"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(InvalidOptionError, match="bad.jsonl:1"):
        discover([], manifest=bad)
    with pytest.raises(InvalidOptionError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_cli_killed_midway_then_rerun_completes(tiny_checkpoint, tmp_path):
    """SIGKILL while transcribing: nothing half-written, and the same command finishes the rest."""
    src = tmp_path / "many"
    src.mkdir()
    for i in range(24):
        shutil.copy(AUDIO / "en" / "jfk.wav", src / f"clip{i:02d}.wav")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "asr.cli", "batch", str(src), "-o", str(out), "-f", "txt", "srt",
           "--model", str(tiny_checkpoint), "--max-new-tokens", "40", "--batch-size", "4", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(load_state(out)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done_before = len(load_state(out))
    assert 4 <= done_before < 24, done_before
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - done_before} transcribed, {done_before} already done, 0 failed" in rerun.stderr
    texts = {p.read_text() for p in out.glob("*.txt")}
    assert len(list(out.glob("*.txt"))) == 24 and len(list(out.glob("*.srt"))) == 24 and len(texts) == 1
    assert not list(out.rglob("*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path):
    """What a killed run's write_atomic leaves (a dead writer's, or this process's own) goes; a live writer's and
    files of other names stay."""
    from asr.writers import remove_stale_temps

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # that process has exited
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    stale = [tmp_path / f".x.wav.txt.{dead}.0a1b2c.tmp", sub / f".y.wav.srt.{os.getpid()}.ffffff.tmp"]
    kept = [tmp_path / f".z.wav.txt.{os.getppid()}.123abc.tmp", tmp_path / ".notes.tmp", tmp_path / "x.wav.txt"]
    for p in stale + kept:
        p.write_text("partial")
    assert remove_stale_temps(tmp_path) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_cli_exit_status_and_errors(tiny_checkpoint, archive, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "asr.cli", "batch", "--model", str(tiny_checkpoint), "--max-new-tokens", "4"]
    r = subprocess.run(base + [str(archive), "-o", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stderr and FAILURES_FILE in r.stderr
    assert (tmp_path / "o" / STATE_FILE).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(base + [str(empty), "-o", str(tmp_path / "o2")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no audio or video files" in r.stderr
    r = subprocess.run(base + [str(archive), "-o", str(tmp_path / "o3"), "-l", "klingon"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "klingon" in r.stderr


def test_cli_batch_with_speakers(tiny_checkpoint, tmp_path):
    """--speakers in a batch: each output carries speaker labels; without a speaker model it cannot start."""
    from tools.speaker_checkpoint import write_checkpoint

    campplus = write_checkpoint(tmp_path / "campplus", size="tiny", seed=0)
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((AUDIO / "en").glob("*.wav"))[:2]:
        shutil.copy(p, src / p.name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "asr.cli", "batch", str(src), "--model", str(tiny_checkpoint), "--max-new-tokens",
            "4", "-f", "txt", "json"]
    r = subprocess.run(base + ["-o", str(tmp_path / "o"), "--speakers", "auto", "--speaker-model", str(campplus)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for txt in (tmp_path / "o").glob("*.txt"):
        assert all(line.startswith("S") and ": " in line for line in txt.read_text().strip().splitlines())
    assert all(s["speaker"] for j in (tmp_path / "o").glob("*.json") for s in json.loads(j.read_text())["segments"])
    r = subprocess.run(base + ["-o", str(tmp_path / "o2"), "--speakers", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--speaker-model" in r.stderr
