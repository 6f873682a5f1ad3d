"""Entry point of the MCP Bundle (.mcpb): start funasr-nano-mcp with the settings an MCPB host (Claude Desktop)
passes from the bundle's user_config.

    python mcpb_entry.py [SERVER FLAGS...] -- [FOLDER...]

tools/bundle.py copies this file to the bundle's root, next to pyproject.toml, asr/ and server/, and the manifest
runs it as `uv run --project <bundle> python <bundle>/mcpb_entry.py ...`. It exists for three reasons:

- A `directory` setting with `multiple: true` reaches the command line as one argument per folder (the host expands
  `${user_config.allowed_directories}` only when it stands alone in `args`, and never inside `env`), so
  `--allowed-root ${user_config.allowed_directories}` would pair the flag with the first folder only. Here every
  folder after `--` becomes its own `--allowed-root FOLDER`.
- Hosts do not always substitute every placeholder: a `${HOME}` inside a user_config default, or an optional
  setting left unset, can arrive verbatim. A folder that starts with ${HOME}, ${DESKTOP}, ${DOCUMENTS} or
  ${DOWNLOADS} is expanded here; any other value that is still a bare `${...}` placeholder is dropped (with a note
  on stderr), so the server falls back to its default instead of failing on a literal placeholder.
- Everything else is the server's own: flags and FUNASR_NANO_MCP_* variables go to `server.__main__.main` as they
  are, so the bundle accepts exactly what `funasr-nano-mcp` accepts.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV_PREFIX = "FUNASR_NANO_MCP_"
_PLACEHOLDER = re.compile(r"^\$\{[^}]*\}$")  # a whole value that is still an unsubstituted ${...}
_FOLDER_VARIABLE = re.compile(r"^\$\{(HOME|DESKTOP|DOCUMENTS|DOWNLOADS)\}(?=$|[/\\])")
_HOME_SUBFOLDER = {"HOME": "", "DESKTOP": "Desktop", "DOCUMENTS": "Documents", "DOWNLOADS": "Downloads"}


def expand_folder(value: str, home: Path | None = None) -> str:
    """`${HOME}/Music` -> `/Users/me/Music` (and ${DESKTOP}, ${DOCUMENTS}, ${DOWNLOADS}); other values unchanged."""
    match = _FOLDER_VARIABLE.match(value)
    if not match:
        return value
    base = (home or Path.home()) / _HOME_SUBFOLDER[match.group(1)]
    rest = value[match.end():].lstrip("/\\")
    return str(base / rest) if rest else str(base)


def translate(argv: Sequence[str], env: Mapping[str, str], home: Path | None = None,
              warn=None) -> tuple[list[str], dict[str, str]]:
    """(server argv, server environment) from the bundle's command line and environment.

    `argv` is `[FLAGS...] [-- FOLDER...]`: each folder becomes `--allowed-root FOLDER`. A flag whose value is an
    unsubstituted placeholder is dropped with its value, and so is a FUNASR_NANO_MCP_* variable whose whole value is
    one. `warn(message)` is told about each thing dropped (default: stderr).
    """
    warn = warn or (lambda message: sys.stderr.write(f"funasr-nano-mcp (bundle): {message}\n"))
    args = list(argv)
    flags, folders = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    out: list[str] = []
    i = 0
    while i < len(flags):
        item = flags[i]
        value_follows = item.startswith("--") and "=" not in item and i + 1 < len(flags) \
            and not flags[i + 1].startswith("--")
        if value_follows and _PLACEHOLDER.match(flags[i + 1]):
            warn(f"{item} {flags[i + 1]} was not filled in by the host; using the server's default")
            i += 2
            continue
        if _PLACEHOLDER.match(item):
            warn(f"ignoring the unfilled argument {item}")
        else:
            out.append(item)
        i += 1
    for folder in folders:
        expanded = expand_folder(folder, home)
        if "${" in expanded:
            warn(f"ignoring the folder {folder!r}: the host left a placeholder in it")
            continue
        out += ["--allowed-root", expanded]
    server_env = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and _PLACEHOLDER.match(value):
            warn(f"{name}={value} was not filled in by the host; using the server's default")
            continue
        server_env[name] = value
    return out, server_env


def main() -> None:
    argv, env = translate(sys.argv[1:], os.environ)
    for name in [n for n in os.environ if n not in env]:
        del os.environ[name]
    from server.__main__ import main as serve  # the bundle's copy: this file's folder is first on sys.path

    serve(argv)


if __name__ == "__main__":
    main()
