"""The transcript viewer: an MCP App (extension `io.modelcontextprotocol/ui`) for transcription results.

`transcript.html` is one self-contained page (the app and the MCP Apps client library, inlined; no network), built
from `server/viewer/src/` by `tools/build_viewer.sh` and shipped in the package. A host that supports MCP Apps
renders it in a sandboxed frame for a tool whose `_meta.ui.resourceUri` is `VIEWER_URI`, and passes it the tool's
result; while a job is queued or running the page polls `get_transcript` through the host.

    mcp = MCPServer("funasr-nano", extensions=[viewer_apps()])
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the MCP SDK loads only when the server is built
    from mcp.server.apps import Apps

VIEWER_URI = "ui://funasr-nano/transcript.html"
HTML_FILE = "transcript.html"


@cache
def viewer_html() -> str:
    """The viewer's HTML document (text/html;profile=mcp-app)."""
    return files(__name__).joinpath(HTML_FILE).read_text(encoding="utf-8")


def viewer_apps() -> Apps:
    """The MCP Apps extension with the viewer registered at `VIEWER_URI`.

    The page makes no network requests: its CSP declares no domains (hosts then allow none). It asks for
    clipboard-write (its Copy button; without it the page falls back to a selection copy) and no other permission.
    """
    from mcp.server.apps import Apps, ResourceCsp, ResourcePermissions

    apps = Apps()
    apps.add_html_resource(
        VIEWER_URI,
        viewer_html(),
        name="transcript-viewer",
        title="Transcript viewer",
        description="Interactive transcript: segments with times and speakers, search, copy, and .srt/.vtt/.txt "
        "downloads; follows a queued or running job until its transcript is ready.",
        csp=ResourceCsp(),
        permissions=ResourcePermissions(clipboard_write={}),
        prefers_border=True,
    )
    return apps
