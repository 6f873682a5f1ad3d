"""Tasks for transcriptions: a task handle at once, then polling for progress and the result, and cancel.

Two protocol revisions, one mechanism (a ServerMiddleware: it answers the task methods itself and turns a
transcription call into a task before the SDK shapes the result):

- 2026-07-28, the `io.modelcontextprotocol/tasks` extension: when a `tools/call` of transcribe_file/transcribe_url
  declares the extension in its per-request client capabilities, the answer is a `CreateTaskResult`
  (`resultType: "task"`); the client polls `tasks/get` (status, progress in `statusMessage`, the `CallToolResult`
  inlined once completed) and may send `tasks/cancel`. `tasks/update` is acknowledged (these tasks never need
  input). Task methods from a client that did not declare the extension are refused with -32021.
- 2025-11-25, the experimental task-augmented `tools/call`: a call with `params.task` gets `{"task": Task}`;
  `tasks/get`, `tasks/result` (waits for the end, then the `CallToolResult`), `tasks/cancel` and `tasks/list`.
  The handshake advertises `capabilities.tasks` and the two tools carry `execution.taskSupport: "optional"`.

A task is the engine's job (task id = job id): it outlives the call and the session that started it, is kept as long
as finished jobs are (--result-ttl-s), and is cancelled with the job. A client without tasks keeps the job handle and
get_transcript. Input the call gets wrong (a refused path, a bad option) still fails at once, as a task that is
already completed with the tool error - a task never hides a mistake the caller can fix now.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.extension import Extension
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, METHOD_NOT_FOUND
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

log = logging.getLogger(__name__)

EXTENSION_ID = "io.modelcontextprotocol/tasks"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
RELATED_TASK_META = "io.modelcontextprotocol/related-task"
MISSING_CAPABILITY = -32021
TASK_TOOLS = ("transcribe_file", "transcribe_url")
TASK_METHODS = ("tasks/get", "tasks/result", "tasks/cancel", "tasks/list", "tasks/update")
POLL_MS = 1000

# Set (for the one request being turned into a task) while the tool runs: the tool then answers as soon as its job
# is queued instead of waiting for the call budget. A context variable, so it is scoped to that request's task.
SUBMIT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("funasr_nano_submit_only", default=False)


class TasksExtension(Extension):
    """Advertises the tasks extension in the server's capabilities (the middleware does the work)."""

    identifier = EXTENSION_ID


@dataclass
class TaskRecord:
    task_id: str
    job_id: str | None  # None: finished at once (the call failed before a job existed)
    include_segments: bool
    created: dt.datetime
    final: dict | None = None  # the CallToolResult of a task that had no job
    updated: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Tasks:
    """The server middleware. The app state (`ctx.lifespan_context`) holds the engine and the `tasks` dict;
    `render(state, job, include_segments)` gives a finished job's CallToolResult as a wire dict (what the tool would
    return) and `progress(state, job)` its progress line while it runs."""

    def __init__(self, render: Callable[[Any, Any, bool], dict], progress: Callable[[Any, Any], str], ttl_ms: int):
        self.render = render
        self.progress = progress
        self.ttl_ms = ttl_ms

    async def __call__(self, ctx: Any, call_next: Callable) -> Any:
        method = ctx.method
        legacy = ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS
        params: Mapping[str, Any] = ctx.params or {}
        if method == "initialize":
            result = await call_next(ctx)
            if isinstance(result, dict):
                caps = result.setdefault("capabilities", {})
                caps["tasks"] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            return result
        if method == "tools/list" and legacy:
            result = await call_next(ctx)
            for tool in result.get("tools", []) if isinstance(result, dict) else []:
                if tool.get("name") in TASK_TOOLS:
                    tool["execution"] = {"taskSupport": "optional"}
            return result
        if method == "tools/call" and params.get("name") in TASK_TOOLS:
            if (legacy and isinstance(params.get("task"), dict)) or (not legacy and _declared(params)):
                return await self._create(ctx, call_next, legacy)
            return await call_next(ctx)
        if method in TASK_METHODS:
            if not legacy and not _declared(params):
                raise MCPError(code=MISSING_CAPABILITY, message="Missing required client capability",
                               data={"requiredCapabilities": {"extensions": {EXTENSION_ID: {}}}})
            if (legacy and method == "tasks/update") or (not legacy and method in ("tasks/result", "tasks/list")):
                raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=method)
            result = await self._answer(ctx.lifespan_context, method, params, legacy)
            # answered here, not by the SDK's handlers: a 2026-era result must say its type itself
            return result if legacy else {"resultType": "complete", **result}
        return await call_next(ctx)

    async def _answer(self, state: Any, method: str, params: Mapping[str, Any], legacy: bool) -> dict:
        if method == "tasks/list":
            return {"tasks": [self._wire(state, r, legacy) for r in list(state.tasks.values())
                              if self._alive(state, r)]}
        record = self._record(state, params)
        if method == "tasks/get":
            wire = self._wire(state, record, legacy)
            if not legacy and wire["status"] == "completed":
                wire["result"] = self._result(state, record)
            return wire
        if method == "tasks/result":
            return await self._wait_result(state, record)
        if method == "tasks/cancel":
            return self._cancel(state, record, legacy)
        return {}  # tasks/update: nothing here ever waits for input

    # ---- creation ----------------------------------------------------------------------------------------------
    async def _create(self, ctx: Any, call_next: Callable, legacy: bool) -> dict:
        state = ctx.lifespan_context
        token = SUBMIT_ONLY.set(True)
        try:
            result = await call_next(ctx)
        finally:
            SUBMIT_ONLY.reset(token)
        result = dict(result)
        structured = result.get("structuredContent") or {}
        job_id = None if result.get("isError") else structured.get("job_id")
        args = (ctx.params or {}).get("arguments") or {}
        now = dt.datetime.now(dt.UTC)
        record = TaskRecord(task_id=job_id or _new_id(), job_id=job_id, include_segments=bool(args.get("include_segments")),
                            created=now, updated=now)
        if job_id is None:  # the call failed before any work: a task that is already completed with that error
            result.pop("resultType", None)
            record.final = result
        self._prune(state)
        state.tasks[record.task_id] = record
        wire = self._wire(state, record, legacy)
        log.info("task %s created for %s", record.task_id, (ctx.params or {}).get("name"))
        return {"task": wire} if legacy else {"resultType": "task", **wire}

    # ---- state -------------------------------------------------------------------------------------------------
    def _record(self, state: Any, params: Mapping[str, Any]) -> TaskRecord:
        task_id = params.get("taskId")
        record = state.tasks.get(task_id) if isinstance(task_id, str) else None
        if record is None or not self._alive(state, record):
            raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: task {task_id!r} not found "
                           "(finished tasks are kept for --result-ttl-s and lost when the server restarts)")
        return record

    def _alive(self, state: Any, record: TaskRecord) -> bool:
        return record.job_id is None or state.engine.get(record.job_id) is not None

    def _prune(self, state: Any) -> None:
        for task_id, record in list(state.tasks.items()):
            if not self._alive(state, record):
                del state.tasks[task_id]

    def _status(self, state: Any, record: TaskRecord) -> tuple[str, str, dt.datetime]:
        if record.job_id is None:
            return "completed", "the call failed; the result holds the error", record.updated
        job = state.engine.get(record.job_id)
        finished = (dt.datetime.now(dt.UTC) if job.finished is None else
                    record.created + dt.timedelta(seconds=max(0.0, job.finished - job.submitted)))
        if job.state in ("queued", "running"):
            return "working", self.progress(state, job), dt.datetime.now(dt.UTC)
        if job.state == "cancelled":
            return "cancelled", f"cancelled: {job.error}", finished
        if job.state == "failed":
            return "completed", f"failed: {job.error}", finished
        return "completed", f"transcribed {job.duration_s:.1f} s of audio", finished

    def _wire(self, state: Any, record: TaskRecord, legacy: bool) -> dict:
        status, message, updated = self._status(state, record)
        wire = {"taskId": record.task_id, "status": status, "statusMessage": message,
                "createdAt": _iso(record.created), "lastUpdatedAt": _iso(max(updated, record.created))}
        if legacy:
            wire.update(ttl=self.ttl_ms, pollInterval=POLL_MS)
        else:
            wire.update(ttlMs=self.ttl_ms, pollIntervalMs=POLL_MS)
        return wire

    def _result(self, state: Any, record: TaskRecord) -> dict:
        if record.final is not None:
            return dict(record.final)
        return self.render(state, state.engine.get(record.job_id), record.include_segments)

    async def _wait_result(self, state: Any, record: TaskRecord) -> dict:
        job = None if record.job_id is None else state.engine.get(record.job_id)
        while job is not None and not job.done.is_set():
            await anyio.sleep(0.05)
        result = self._result(state, record)
        result.setdefault("_meta", {})[RELATED_TASK_META] = {"taskId": record.task_id}
        return result

    def _cancel(self, state: Any, record: TaskRecord, legacy: bool) -> dict:
        status, _, _ = self._status(state, record)
        if status != "working":
            if legacy:
                raise MCPError(code=INVALID_PARAMS,
                               message=f"Cannot cancel task {record.task_id}: it is already {status}")
            return {}
        state.engine.cancel(record.job_id)
        log.info("task %s: cancel requested", record.task_id)
        return self._wire(state, record, legacy) if legacy else {}


def _declared(params: Mapping[str, Any]) -> bool:
    meta = params.get("_meta") or {}
    caps = meta.get(CLIENT_CAPABILITIES_META) or {} if isinstance(meta, Mapping) else {}
    extensions = caps.get("extensions") or {} if isinstance(caps, Mapping) else {}
    return isinstance(extensions, Mapping) and EXTENSION_ID in extensions


def _new_id() -> str:
    return secrets.token_hex(6)
