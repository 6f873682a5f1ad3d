"""`funasr-nano batch --ray`: the batch job on a local Ray cluster of two worker nodes (one model replica each),
with the tiny model: the same outputs as the single-machine run, a corrupt file among good ones, and a driver
killed midway that a rerun completes. Skipped where Ray Data is not installed (`pip install -e '.[ray]'`;
tools/test.sh installs it)."""

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

from asr.batch import FAILURES_FILE, BatchOptions, discover, load_state, run_batch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO / "tests" / "data" / "audio"
TOKENS = "6"


@pytest.fixture(scope="module")
def cluster():
    """A head that runs nothing and two worker nodes of one CPU each: each replica lands on its own node."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _cli(args: list[str], **kw) -> list[str]:
    return [sys.executable, "-m", "asr.cli", "batch", *args, "--max-new-tokens", TOKENS, "--dtype", "float32", *kw.get(
        "extra", [])]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}


def test_ray_run_equals_the_single_machine_run(cluster, tiny_checkpoint, tiny_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((AUDIO / "en").glob("*.wav")) + sorted((AUDIO / "zh").glob("*.wav"))[:2]:
        shutil.copy(p, src / p.name)
    (src / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt nonsense" * 10)
    local = tmp_path / "local"
    run_batch(tiny_model, discover([src]), local, BatchOptions(formats=("txt", "json"), max_new_tokens=int(TOKENS),
                                                                progress=False))
    out = tmp_path / "ray"
    r = subprocess.run(_cli([str(src), "-o", str(out), "-f", "txt", "json", "--model", str(tiny_checkpoint),
                             "--ray", cluster.address, "--replicas", "2"]), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]  # one file failed, the rest went on
    assert "7 transcribed, 0 already done, 1 failed" in r.stderr
    names = sorted(p.name for p in local.glob("*.txt"))
    assert names == sorted(p.name for p in out.glob("*.txt")) and len(names) == 7
    for name in names:
        assert (out / name).read_text() == (local / name).read_text()
        stem = name[:-4]
        assert json.loads((out / f"{stem}.json").read_text())["token_ids"] == \
            json.loads((local / f"{stem}.json").read_text())["token_ids"]
    failure = json.loads((out / FAILURES_FILE).read_text().splitlines()[0])
    assert failure["input"].endswith("corrupt.wav") and failure["error"] in ("AudioDecodeError", "EmptyAudioError")
    again = subprocess.run(_cli([str(src), "-o", str(out), "-f", "txt", "json", "--model", str(tiny_checkpoint),
                                 "--ray", cluster.address, "--replicas", "2"]), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert "0 transcribed, 7 already done, 1 failed" in again.stderr, again.stderr[-2000:]


def test_ray_driver_killed_midway_then_rerun_completes(cluster, tiny_checkpoint, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(16):
        shutil.copy(AUDIO / "en" / "jfk.wav", src / f"clip{i:02d}.wav")
    out = tmp_path / "out"
    cmd = _cli([str(src), "-o", str(out), "--model", str(tiny_checkpoint), "--ray", cluster.address, "--replicas", "2",
                "--batch-size", "2"], extra=[])
    cmd[cmd.index("--max-new-tokens") + 1] = "40"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and len(load_state(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done_before = len(load_state(out))
    assert 2 <= done_before < 16, done_before
    rerun = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(load_state(out)) >= 16 and len(list(out.glob("*.txt"))) == 16
    assert len({p.read_text() for p in out.glob("*.txt")}) == 1 and not list(out.rglob("*.tmp"))
