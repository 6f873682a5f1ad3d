"""The real stdio server with the tiny model (MLX loads and computes on the model thread) ends cleanly in every
state: exit status 0, no abort, nothing left in its temporary folder, when stdin closes or SIGINT / SIGTERM
arrives while the model loads, while it is idle, while a job decodes with others queued, and while a URL downloads.

Closing stdin while the model was loading used to end the process with SIGABRT ("terminate called without an
active exception": C++ static destructors ran while the model thread was inside MLX), SIGINT left the server
running until stdin closed, and SIGTERM during a download left the download's temporary folder behind.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.test_hardening_protocol import RawServer, clean_exit
from tests.test_server_support import endless, http_server

LONG_CLIP = "long/voxpopuli_en_test_000.wav"  # 69 s of speech: several segments, decoded for a while
EXIT_LIMIT_S = 10.0  # a hang detector: the exits measured here take ~1 s


@pytest.fixture
def start(tmp_path, tiny_checkpoint, testdata):
    """start(state) -> a RawServer on the tiny model, initialised, driven into `state`."""
    servers = []
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()

    def make(state: str, port: int | None = None) -> RawServer:
        argv = [sys.executable, "-m", "server", "--model", str(tiny_checkpoint),
                "--allowed-root", str(testdata / "audio"), "--url-policy", "any", "--call-budget-s", "1",
                "--log-level", "INFO"]
        server = RawServer(tmp_path, env={"TMPDIR": str(private_tmp)}, argv=argv)
        servers.append(server)
        server.initialize()
        if state == "loading":
            return server
        status = {}
        deadline = time.monotonic() + 120
        while status.get("model_state") != "ready":
            assert time.monotonic() < deadline, server.stderr()[-2000:]
            status = server_status(server)
            assert status["model_state"] != "failed", status
            time.sleep(0.1)
        if state == "busy":  # one job decoding, two queued behind it (different languages: never decoded together)
            for i, language in enumerate(("en", "zh", "ja")):
                server.message({"jsonrpc": "2.0", "id": f"t{i}", "method": "tools/call", "params": {
                    "name": "transcribe_file", "arguments": {"path": str(testdata / "audio" / LONG_CLIP),
                                                             "language": language}}})
            deadline = time.monotonic() + 30
            while (status["running"], status["queued"]) != (1, 2):
                assert time.monotonic() < deadline, status
                status = server_status(server)
        elif state == "downloading":
            server.message({"jsonrpc": "2.0", "id": "dl", "method": "tools/call", "params": {
                "name": "transcribe_url", "arguments": {"url": f"http://127.0.0.1:{port}/slow.wav"}}})
            deadline = time.monotonic() + 30
            while not any(p.name.startswith("funasr-nano") for p in private_tmp.iterdir()):  # the download's folder
                assert time.monotonic() < deadline, server.stderr()[-2000:]
                time.sleep(0.05)
        return server

    yield make, private_tmp
    for server in servers:
        server.kill()


def server_status(server: RawServer) -> dict:
    return server.request("tools/call", {"name": "server_status", "arguments": {}})["result"]["structuredContent"]


def ended_cleanly(server: RawServer, private_tmp, how: str) -> None:
    t0 = time.monotonic()
    if how == "stdin":
        rc = server.finish(timeout=EXIT_LIMIT_S)
    else:
        server.proc.send_signal(getattr(signal, how))
        rc = server.proc.wait(EXIT_LIMIT_S)
    took = time.monotonic() - t0
    log = clean_exit(server, rc)
    assert "terminate called" not in log
    assert took < EXIT_LIMIT_S
    left = [p.name for p in private_tmp.iterdir() if p.name != "mlx"]  # mlx: MLX's own kernel cache
    assert not left, f"temporary files left behind: {left}"


@pytest.mark.parametrize("repeat", range(4))
def test_stdin_closed_while_loading(start, repeat):
    make, private_tmp = start
    ended_cleanly(make("loading"), private_tmp, "stdin")


@pytest.mark.parametrize("how", ["stdin", "SIGINT", "SIGTERM"])
@pytest.mark.parametrize("state", ["loading", "idle", "busy", "downloading"])
def test_every_state_ends_cleanly(start, state, how):
    make, private_tmp = start
    if state == "downloading":
        with http_server({"/slow.wav": endless(b"\0" * 4096, delay_s=0.05)}) as (port, _):
            ended_cleanly(make(state, port), private_tmp, how)
    else:
        ended_cleanly(make(state), private_tmp, how)

