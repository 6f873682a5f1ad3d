"""Start the funasr-nano MCP server over stdio and transcribe one audio file with it.

    python examples/mcp_client.py /abs/path/to/talk.wav [--language en] [--model DIR_OR_REPO]

The server is the `funasr-nano-mcp` console script when installed, else `python -m server` from this
checkout. The folder of the file is passed as the allowed root. Progress goes to stderr, the
transcript to stdout. This is what Claude Desktop does, minus the chat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

REPO = Path(__file__).resolve().parents[1]


def server_command() -> tuple[str, list[str]]:
    script = shutil.which("funasr-nano-mcp") or shutil.which("funasr-nano-mcp", path=str(Path(sys.executable).parent))
    return (script, []) if script else (sys.executable, ["-m", "server"])


async def run(args: argparse.Namespace) -> int:
    audio = Path(args.audio).expanduser().resolve()
    command, pre = server_command()
    env = {"FUNASR_NANO_MCP_ALLOWED_ROOTS": str(audio.parent)}
    if args.model:
        env["FUNASR_NANO_MCP_MODEL"] = args.model
    for key, value in os.environ.items():  # pass the user's own server settings through
        if key.startswith(("FUNASR_NANO_MCP_", "HF_")) and key not in env:
            env[key] = value
    params = StdioServerParameters(command=command, args=pre, env=env, cwd=str(REPO))

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        print(f"  [{progress:7.2f}/{total or 0:7.2f}] {message or ''}", file=sys.stderr)

    async with Client(params, mode="legacy") as client:  # the 2025-11-25 handshake Claude Desktop uses
        tools = [t.name for t in (await client.list_tools()).tools]
        print(f"server tools: {', '.join(tools)}", file=sys.stderr)
        result = await client.call_tool("transcribe_file", {"path": str(audio), "language": args.language},
                                        progress_callback=on_progress)
        while not result.is_error and (result.structured_content or {}).get("status") in ("queued", "running"):
            job_id = result.structured_content["job_id"]
            print(f"still running as job {job_id}; waiting", file=sys.stderr)
            result = await client.call_tool("get_transcript", {"job_id": job_id}, progress_callback=on_progress)
    if result.is_error:
        print(result.content[0].text, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.structured_content, ensure_ascii=False, indent=2))
    else:
        print(result.content[0].text)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("audio", help="audio or video file to transcribe")
    ap.add_argument("--language", default="auto", help="language code or name, or 'auto' (default)")
    ap.add_argument("--model", help="model directory or Hugging Face repo id (default: the server's default)")
    ap.add_argument("--json", action="store_true", help="print the structured result instead of the text")
    raise SystemExit(anyio.run(run, ap.parse_args()))


if __name__ == "__main__":
    main()
