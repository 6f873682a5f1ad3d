"""The real stdio server (a subprocess running `server.__main__.main` with the fake model) fed raw bytes.

Malformed JSON, unknown methods, wrong types, 10 MB lines, pipelined requests and hypothesis-generated lines: the
server answers every request it can parse, ignores what it cannot, keeps serving, and writes nothing but JSON-RPC
messages on stdout. Closing stdin mid-call, or the client vanishing altogether, ends the process cleanly (exit
status 0, the running job cancelled, no traceback) within seconds.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server_support import JFK, REPO

RUN = "from tests.test_server_support import run_fake_server; run_fake_server()"
PROTOCOL = "2025-11-25"


def jsonrpc(line: bytes) -> dict:
    """Parse one stdout line; fail unless it is a JSON-RPC 2.0 message."""
    msg = json.loads(line)
    assert isinstance(msg, dict) and msg.get("jsonrpc") == "2.0", line[:200]
    assert "method" in msg or ("id" in msg and ("result" in msg) != ("error" in msg)), line[:200]
    return msg


class RawServer:
    """The server over pipes, read without threads (select), so the client side can vanish at any moment."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, argv: list[str] | None = None):
        """argv: the server's command line (default: the fake model's server)."""
        self.err_path = tmp / f"stderr-{time.monotonic_ns()}.txt"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                # queue of 64: the pipelining test sends 20 transcriptions at once, more than the default 16 could
                # hold if the worker has not taken any yet (a loaded CI machine); a full queue is tested elsewhere
                argv or [sys.executable, "-c", RUN, "--allowed-root", str(JFK.parent), "--url-policy", "off",
                         "--queue-size", "64"], cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env={**os.environ, "FAKE_LOAD_S": "0", "FAKE_RTF": "0", **(env or {})})
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.lines: list[bytes] = []  # every line the server wrote
        self.next_id = 0

    # -- writing
    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def message(self, obj: dict) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def request(self, method: str, params: dict | None = None, timeout: float = 15.0) -> dict:
        self.next_id += 1
        rid = f"req-{self.next_id}"
        self.message({"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})})
        return self.wait_for(rid, timeout)

    def initialize(self) -> dict:
        answer = self.request("initialize", {"protocolVersion": PROTOCOL, "capabilities": {},
                                             "clientInfo": {"name": "raw-test", "version": "0"}})
        self.message({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer

    def ping(self) -> None:
        assert self.request("ping")["result"] == {}

    # -- reading
    def read_line(self, deadline: float) -> bytes | None:
        """The next stdout line (validated as JSON-RPC), or None at end of file."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the server")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    assert not self.buf, self.buf[:200]  # nothing half-written at the end
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.lines.append(line)
        jsonrpc(line)
        return line

    def wait_for(self, rid, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(deadline)
            assert line is not None, "the server closed stdout"
            msg = json.loads(line)
            if msg.get("id") == rid and "method" not in msg:
                return msg

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while self.read_line(deadline) is not None:
                pass
        except TimeoutError:
            pass

    # -- ending
    def finish(self, timeout: float = 20.0) -> int:
        """Close stdin, read stdout to its end, and wait for the process."""
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while self.read_line(deadline) is not None:
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# the SDK logs a request whose handler raised (e.g. prompts/get of an unknown prompt) with its traceback, then
# answers it with an error: that is handled, not a crash
_HANDLED = re.compile(r"^\S+ ERROR mcp\.shared\.jsonrpc_dispatcher: handler for '[^']*' raised\n(?:(?!\d\d:\d\d:\d\d ).*\n)*",
                      re.MULTILINE)


def clean_exit(server: RawServer, rc: int) -> str:
    log = server.stderr()
    assert rc == 0, log[-3000:]
    unhandled = _HANDLED.sub("", log)
    assert "Traceback" not in unhandled and "Exception ignored" not in unhandled, unhandled[-3000:]
    assert "funasr-nano-mcp stopped" in log
    return log


@pytest.fixture
def raw(tmp_path):
    server = RawServer(tmp_path)
    yield server
    server.kill()


def call(path: str, rid: str, token: str | None = None) -> dict:
    params: dict = {"name": "transcribe_file", "arguments": {"path": path}}
    if token:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


# --- malformed and hostile messages ---------------------------------------------------------------------------
HOSTILE_LINES = [
    b"this is not json",
    b'{"jsonrpc": "2.0", "id": 1',  # cut short
    b"[1, 2, 3]",
    b'[{"jsonrpc": "2.0", "id": "batch", "method": "ping"}]',  # batches are not part of the protocol any more
    b"\xff\xfe\x00\x80 invalid utf-8",
    b"",
    b"   \t  ",
    b"null",
    b'"a string"',
    b"1e999999",
    b"[" * 100_000 + b"]" * 100_000,  # deeply nested
    b'{"jsonrpc": "1.0", "id": 5, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": {"an": "object"}, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": 6, "method": 42}',
    b'{"jsonrpc": "2.0", "id": 7, "result": {}}',  # a response to nothing
    b'{"jsonrpc": "2.0", "id": 8, "error": {"code": 1, "message": "x"}}',
    b'{"jsonrpc": "2.0", "method": "no/such/notification", "params": {}}',
    b'{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "never-sent"}}',
    b'{"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": "x"}}',
    b"x" * (10 << 20),  # a 10 MB line of garbage
]


def test_malformed_messages_are_survived(raw):
    # before the handshake: a request is answered or ignored, never fatal
    raw.message({"jsonrpc": "2.0", "id": "early", "method": "tools/list"})
    raw.drain(1.0)
    assert raw.initialize()["result"]["serverInfo"]["name"] == "funasr-nano"
    for line in HOSTILE_LINES:
        raw.send(line + b"\n")
        raw.ping()  # still serving, in order
    # requests it can parse but not honour get a JSON-RPC error or a tool error, with their own id
    assert raw.request("no/such/method")["error"]["code"] == -32601
    assert raw.request("tools/call", {"name": "no_such_tool", "arguments": {}})["result"]["isError"] is True
    bad_args = raw.request("tools/call", {"name": "transcribe_file", "arguments": {"path": 123, "itn": "maybe"}})
    assert bad_args["result"]["isError"] is True
    assert "id" in raw.request("tools/call", {"name": "transcribe_file"})  # no arguments: answered somehow
    assert "error" in raw.request("resources/read", {"uri": "file:///etc/passwd"})  # no resources: no file leak
    assert "error" in raw.request("prompts/get", {"name": "x"})  # (the SDK logs this one with a traceback)
    # a 10 MB argument: refused by the schema, answered within 30 s and briefly
    raw.message(call("/" + "a" * (10 << 20), "huge"))
    huge = raw.wait_for("huge", timeout=30)
    assert huge["result"]["isError"] is True  # within wait_for's 30 s
    assert len(raw.lines[-1]) < 20_000
    # a 10 MB request the server accepts
    assert raw.request("ping", {"_meta": {"padding": "p" * (10 << 20)}})["result"] == {}
    # and real work still goes through
    done = raw.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(JFK)}})
    assert done["result"]["isError"] is False
    assert done["result"]["structuredContent"]["text"] == "fake transcript of 11.00 seconds"
    clean_exit(raw, raw.finish())


def test_pipelined_requests_all_answered(raw):
    raw.initialize()
    ids = [f"p{i}" for i in range(60)]
    burst = b"".join(json.dumps(call(str(JFK), rid) if i % 3 == 0 else
                                {"jsonrpc": "2.0", "id": rid, "method": "tools/list" if i % 3 == 1 else "ping"}
                                ).encode() + b"\n" for i, rid in enumerate(ids))
    raw.send(burst)  # 60 requests in one write, without waiting
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(ids):
        msg = json.loads(raw.read_line(deadline))
        if msg.get("id") in ids and "method" not in msg:
            assert msg["id"] not in seen
            seen[msg["id"]] = msg
    for i, rid in enumerate(ids):
        if i % 3 == 0:
            assert seen[rid]["result"]["structuredContent"]["status"] == "completed", seen[rid]
    clean_exit(raw, raw.finish())


# --- the client going away ------------------------------------------------------------------------------------
def _start_slow_call(server: RawServer) -> None:
    server.initialize()
    server.message(call(str(JFK), "slow", token="t"))
    deadline = time.monotonic() + 20
    while True:  # wait until the job runs and reports progress
        msg = json.loads(server.read_line(deadline))
        if msg.get("method") == "notifications/progress" and "of 11 s" in msg["params"].get("message", ""):
            return


def test_stdin_closed_mid_call(tmp_path):
    server = RawServer(tmp_path, env={"FAKE_RTF": "2"})  # 11 s of audio take 22 s
    try:
        _start_slow_call(server)
        log = clean_exit(server, server.finish(timeout=20))  # the job alone would take 22 s
        assert "cancelled" in log  # the job went with its call
    finally:
        server.kill()


def test_client_vanishes_mid_call(tmp_path):
    """The client process dies: both pipes close under a running call."""
    server = RawServer(tmp_path, env={"FAKE_RTF": "2"})
    try:
        _start_slow_call(server)
        server.proc.stdout.close()
        server.proc.stdin.close()
        rc = server.proc.wait(20)  # the job alone would take 22 s
        log = clean_exit(server, rc)
        assert "client closed the connection" in log and "cancelled" in log
    finally:
        server.kill()


def test_client_stops_reading_mid_call(tmp_path):
    """The client closes its reading end but keeps stdin open: the next progress write fails and the job is
    cancelled at once. The process itself leaves when stdin closes (the SDK reads stdin in a thread that only
    end of file releases); a client that dies closes both pipes (the test above)."""
    server = RawServer(tmp_path, env={"FAKE_RTF": "2"})
    try:
        _start_slow_call(server)
        server.proc.stdout.close()
        deadline = time.monotonic() + 15
        while "cancelled" not in server.stderr().split("server.worker: model", 1)[-1]:
            assert time.monotonic() < deadline, server.stderr()[-2000:]
            time.sleep(0.2)
        server.proc.stdin.close()
        clean_exit(server, server.proc.wait(15))
    finally:
        server.kill()


# --- fuzzing the wire ------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
METHODS = ["ping", "tools/list", "tools/call", "resources/list", "resources/read", "prompts/list", "prompts/get",
           "completion/complete", "logging/setLevel", "notifications/cancelled", "notifications/progress",
           "notifications/roots/list_changed", "roots/list", "sampling/createMessage", "server/discover"]
ARGS = st.fixed_dictionaries({}, optional={
    "path": st.text(max_size=80) | st.sampled_from([str(JFK), "/etc/passwd", "/dev/zero", "~", ""]),
    "url": st.text(max_size=80), "job_id": st.text(max_size=20), "language": st.text(max_size=20),
    "hotwords": st.lists(st.text(max_size=30), max_size=5) | JSON, "itn": JSON, "wait": st.booleans(),
})
MESSAGES = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]) | JSON,
        "id": st.integers() | st.text(max_size=10) | st.none() | JSON,
        "method": st.sampled_from(METHODS) | st.text(max_size=20),
        "params": st.one_of(JSON, st.fixed_dictionaries({
            "name": st.sampled_from(["transcribe_file", "get_transcript", "cancel_transcription", "list_languages",
                                     "server_status", "transcribe_url"]) | st.text(max_size=20),
            "arguments": ARGS | JSON})),
    }).map(lambda m: json.dumps(m).encode()),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    server = RawServer(tmp_path_factory.mktemp("fuzz"))
    server.initialize()
    yield server
    server.kill()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=MESSAGES)
def test_fuzzed_lines(fuzzed, line):
    fuzzed.send(line + b"\n")
    fuzzed.ping()  # answered: the server lives, and everything it wrote meanwhile was JSON-RPC


def test_fuzzed_server_exits_cleanly(fuzzed):
    fuzzed.ping()
    assert all(jsonrpc(line) for line in fuzzed.lines)
    clean_exit(fuzzed, fuzzed.finish())
