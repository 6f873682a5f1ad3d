"""Tasks over real stdio, in both protocol revisions: the 2026-07-28 `io.modelcontextprotocol/tasks` extension and
the 2025-11-25 task-augmented `tools/call`. The server is the real `main()` in a subprocess (fake model, 1 s of
work per 10 s of audio); the client is the SDK's stdio transport carrying JSON-RPC messages written here (the SDK's
client has no task API yet), so every field on the wire is what the specifications say.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import anyio
import pytest
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.message import SessionMessage
from mcp.types import JSONRPCNotification, JSONRPCRequest

from server.schemas import TranscriptionOutput
from tests.test_server_support import JFK, REPO, write_wav

pytestmark = pytest.mark.anyio
EXT = "io.modelcontextprotocol/tasks"
MODERN = "2026-07-28"
LEGACY = "2025-11-25"


@pytest.fixture
def anyio_backend():
    return "asyncio"


class RpcError(Exception):
    def __init__(self, error: dict):
        super().__init__(error.get("message"))
        self.code, self.data = error.get("code"), error.get("data")


class Wire:
    """JSON-RPC over the SDK's stdio transport: requests with ids, answers matched by id (notifications skipped)."""

    def __init__(self, read, write, version: str, tasks: bool = True):
        self.read, self.write, self.version, self.tasks = read, write, version, tasks
        self.ids = itertools.count(1)

    def _meta(self) -> dict:
        if self.version != MODERN:
            return {}
        caps = {"extensions": {EXT: {}}} if self.tasks else {}
        return {"_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                          "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "0"},
                          "io.modelcontextprotocol/clientCapabilities": caps}}

    async def request(self, method: str, params: dict | None = None) -> dict:
        rid = next(self.ids)
        body = {**(params or {}), **self._meta()}
        await self.write.send(SessionMessage(JSONRPCRequest(jsonrpc="2.0", id=rid, method=method, params=body)))
        with anyio.fail_after(30):
            while True:
                msg = await self.read.receive()
                if isinstance(msg, Exception):
                    raise msg
                m = msg.message
                if getattr(m, "id", None) != rid:
                    continue
                if getattr(m, "error", None) is not None:
                    raise RpcError(m.error.model_dump())
                return m.result

    async def handshake(self) -> dict:
        result = await self.request("initialize", {"protocolVersion": LEGACY, "capabilities": {},
                                                   "clientInfo": {"name": "test", "version": "0"}})
        await self.write.send(SessionMessage(JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")))
        return result


def server_params(root, fake_rtf: float = 0.1) -> StdioServerParameters:
    args = ["-c", "from tests.test_server_support import run_fake_server; run_fake_server()", "--allowed-root",
            str(root), "--allowed-root", str(JFK.parent), "--no-warmup"]
    return StdioServerParameters(command=sys.executable, args=args, cwd=str(REPO),
                                 env={"FAKE_RTF": str(fake_rtf), "FUNASR_NANO_MCP_LOG_LEVEL": "WARNING"})


async def poll(wire: Wire, task_id: str, until: tuple[str, ...]) -> tuple[dict, list[str]]:
    seen = []
    with anyio.fail_after(30):
        while True:
            task = await wire.request("tasks/get", {"taskId": task_id})
            seen.append(task["status"])
            if task["status"] in until:
                return task, seen
            await anyio.sleep(0.05)


async def test_modern_tasks_extension(tmp_path):
    clip = write_wav(tmp_path / "talk.wav", 20.0)  # 2 s of fake work
    async with stdio_client(server_params(tmp_path), errlog=open(os.devnull, "w")) as (read, write):
        wire = Wire(read, write, MODERN)
        discover = await wire.request("server/discover")
        assert EXT in discover["capabilities"]["extensions"]
        created = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(clip)}})
        assert created["resultType"] == "task" and created["status"] == "working"
        assert created["ttlMs"] > 0 and created["pollIntervalMs"] > 0 and created["createdAt"].endswith("Z")
        task, seen = await poll(wire, created["taskId"], ("completed",))
        assert "working" in seen and task["resultType"] == "complete"
        out = TranscriptionOutput.model_validate(task["result"]["structuredContent"])
        assert out.status == "completed" and out.text == "fake transcript of 20.00 seconds"
        assert not task["result"].get("isError")

        # cancel: acknowledged, then the task ends cancelled and the model stops
        slow = write_wav(tmp_path / "slow.wav", 200.0)  # 20 s of fake work
        created = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(slow)}})
        await poll(wire, created["taskId"], ("working",))
        assert await wire.request("tasks/cancel", {"taskId": created["taskId"]}) == {"resultType": "complete"}
        task, _ = await poll(wire, created["taskId"], ("cancelled", "completed"))
        assert task["status"] == "cancelled"

        # a mistake the caller can fix now is a completed task holding the tool error, at once
        bad = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": "/etc/passwd"}})
        task, _ = await poll(wire, bad["taskId"], ("completed",))
        assert task["result"]["isError"] and "outside the folders" in task["result"]["content"][0]["text"]

        with pytest.raises(RpcError) as err:
            await wire.request("tasks/get", {"taskId": "nope"})
        assert err.value.code == -32602
        with pytest.raises(RpcError) as err:
            await wire.request("tasks/result", {"taskId": created["taskId"]})  # not in this revision
        assert err.value.code == -32601

        # a client that did not declare the extension gets plain results, and no task methods
        plain = Wire(read, write, MODERN, tasks=False)
        plain.ids = wire.ids
        result = await plain.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(clip)}})
        assert result.get("resultType", "complete") == "complete"
        assert TranscriptionOutput.model_validate(result["structuredContent"]).status == "completed"
        with pytest.raises(RpcError) as err:
            await plain.request("tasks/get", {"taskId": created["taskId"]})
        assert err.value.code == -32021 and EXT in err.value.data["requiredCapabilities"]["extensions"]


async def test_legacy_task_augmented_tool_calls(tmp_path):
    clip = write_wav(tmp_path / "talk.wav", 20.0)
    async with stdio_client(server_params(tmp_path), errlog=open(os.devnull, "w")) as (read, write):
        wire = Wire(read, write, LEGACY)
        init = await wire.handshake()
        assert init["capabilities"]["tasks"]["requests"]["tools"]["call"] == {}
        assert "cancel" in init["capabilities"]["tasks"] and "list" in init["capabilities"]["tasks"]
        tools = {t["name"]: t for t in (await wire.request("tools/list"))["tools"]}
        assert tools["transcribe_file"]["execution"]["taskSupport"] == "optional"
        assert "execution" not in tools["list_languages"]

        created = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(clip)},
                                                    "task": {"ttl": 60000}})
        task = created["task"]
        assert task["status"] == "working" and task["ttl"] > 0 and task["pollInterval"] > 0
        listed = await wire.request("tasks/list")
        assert task["taskId"] in [t["taskId"] for t in listed["tasks"]]
        result = await wire.request("tasks/result", {"taskId": task["taskId"]})  # waits for the end
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}
        assert TranscriptionOutput.model_validate(result["structuredContent"]).text == "fake transcript of 20.00 seconds"
        done = await wire.request("tasks/get", {"taskId": task["taskId"]})
        assert done["status"] == "completed" and "result" not in done  # 2025-11-25: the result via tasks/result

        slow = write_wav(tmp_path / "slow.wav", 200.0)
        created = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(slow)},
                                                    "task": {}})
        cancelled = await wire.request("tasks/cancel", {"taskId": created["task"]["taskId"]})
        assert cancelled["taskId"] == created["task"]["taskId"]
        task, _ = await poll(wire, created["task"]["taskId"], ("cancelled", "completed"))
        assert task["status"] == "cancelled"
        with pytest.raises(RpcError) as err:
            await wire.request("tasks/cancel", {"taskId": created["task"]["taskId"]})  # already terminal
        assert err.value.code == -32602

        # without `task` the same call answers the usual way
        plain = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(clip)}})
        assert plain["structuredContent"]["status"] == "completed"


@pytest.mark.parametrize("version", [MODERN, LEGACY])
async def test_a_client_that_goes_away_mid_task_ends_the_server_cleanly(tmp_path, version):
    """stdin closes while a task's job runs: the job is cancelled and the process ends with status 0, promptly."""
    slow = write_wav(tmp_path / "slow.wav", 300.0)  # 30 s of fake work
    errlog = tmp_path / "stderr.txt"
    params = server_params(tmp_path)
    params.env["FUNASR_NANO_MCP_LOG_LEVEL"] = "INFO"
    with errlog.open("w") as err:
        async with stdio_client(params, errlog=err) as (read, write):
            wire = Wire(read, write, version)
            if version == LEGACY:
                await wire.handshake()
            extra = {"task": {}} if version == LEGACY else {}
            created = await wire.request("tools/call", {"name": "transcribe_file", "arguments": {"path": str(slow)},
                                                        **extra})
            task_id = (created.get("task") or created)["taskId"]
            await poll(wire, task_id, ("working",))
            started = time.monotonic()
        # leaving the context closed stdin; the SDK's transport waits for the process to end
    assert time.monotonic() - started < 10
    logged = errlog.read_text()
    assert f"task {task_id} created" in logged
    assert "Traceback" not in logged and "abort" not in logged.lower()
    assert f"job {task_id} cancelled" in logged  # the work stopped with the client (exit status: test_server_exit)
