"""Build the one-click install artefacts: an MCP Bundle (.mcpb) for Claude Desktop and a server.json for the MCP
Registry.

    python -m tools.bundle [--out dist/] [--repository https://github.com/OWNER/funasr-nano-mlx] [--no-pack]

writes, under --out (default dist/):

- `bundle/`: the bundle's folder - manifest.json, icon.png, mcpb_entry.py, pyproject.toml, README.md, licence
  files, asr/ and server/ (without caches and build output);
- `funasr-nano-mlx-<version>.mcpb`: that folder packed by the official `mcpb` CLI (pinned below, run with npx);
- `server.json`: the MCP Registry entry - the PyPI package run with uvx, and, when the repository is a GitHub one,
  the .mcpb as a GitHub release asset with its SHA-256 (upload exactly this file to release v<version>).

The manifest (spec 0.4) uses the `uv` server type: the bundle carries no dependencies, the host installs them from
pyproject.toml with uv. Settings reach the server as follows (packaging/mcpb_entry.py explains why):

- `allowed_directories` (a folder picker, several folders): `args` end with `-- ${user_config.allowed_directories}`,
  which the host expands to one argument per folder; mcpb_entry.py turns each into `--allowed-root FOLDER`.
- `model`, `quantization`, `url_policy`, `url_allow_hosts`: environment variables FUNASR_NANO_MCP_MODEL,
  _QUANTIZE, _URL_POLICY and _URL_ALLOW_HOSTS, exactly as for `funasr-nano-mcp` itself.

Only the standard library is needed (plus npx for packing); nothing here imports the server.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

MCPB_CLI_VERSION = "2.1.2"  # @anthropic-ai/mcpb on npm: its validate and pack, and the host's config substitution
MCPB_PACKAGE = f"@anthropic-ai/mcpb@{MCPB_CLI_VERSION}"
MANIFEST_VERSION = "0.4"  # the first with server.type "uv"
REGISTRY_SCHEMA = "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json"

NAME = "funasr-nano-mlx"
DISPLAY_NAME = "Fun-ASR-Nano speech-to-text"
DESCRIPTION = "Private speech-to-text on your computer: transcribe audio and video files with Fun-ASR-Nano on MLX."
REGISTRY_DESCRIPTION = "Local, private speech-to-text for audio and video files (Fun-ASR-Nano on MLX)"  # max 100
DEFAULT_MODEL = "FunAudioLLM/Fun-ASR-Nano-2512"
MLT_MODEL = "FunAudioLLM/Fun-ASR-MLT-Nano-2512"
QUANTIZATION_CHOICES = ("none", "8", "4")
URL_POLICIES = ("public", "allowlist", "any", "off")
PLATFORMS = ("darwin", "linux")  # MLX: Metal on Apple Silicon, the CPU (or CUDA) on Linux; no Windows wheels
KEYWORDS = ("speech-to-text", "transcription", "asr", "speech recognition", "audio", "video", "local", "privacy",
            "mlx", "apple silicon", "fun-asr", "multilingual")

ENTRY = "mcpb_entry.py"
ICON = ROOT / "packaging" / "icon.png"
PACKAGES = ("asr", "server")
# never shipped, at any depth (the bundle folder is built from a clean copy, so .venv, tests, .git, .cache and dist
# are not even candidates: only asr/, server/ and the files named in stage() are copied)
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.so", "*.dylib", "node_modules", ".DS_Store",
                              "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis")
NOTICE_GLOBS = ("LICENSE*", "LICENCE*", "NOTICE*", "COPYING*")


def project(root: Path = ROOT) -> dict:
    """pyproject.toml's [project] table."""
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def repository_url(proj: dict, override: str | None = None) -> str | None:
    """The source repository: --repository, else [project.urls] Repository/Source/Homepage; None when unknown."""
    if override:
        return override.rstrip("/")
    urls = {k.lower(): v for k, v in (proj.get("urls") or {}).items()}
    for key in ("repository", "source", "source code", "homepage"):
        if urls.get(key):
            return urls[key].rstrip("/").removesuffix(".git")
    return None


def github_slug(repo: str | None) -> tuple[str, str] | None:
    """("owner", "name") of a https://github.com/owner/name URL, else None."""
    if not repo:
        return None
    parts = urlsplit(repo)
    path = [p for p in parts.path.split("/") if p]
    if parts.netloc.lower() != "github.com" or len(path) != 2:
        return None
    return path[0], path[1]


def registry_name(repo: str | None) -> str:
    """The MCP Registry name: io.github.<owner>/<name> (the namespace GitHub login proves); a placeholder owner when
    the repository is not known yet."""
    slug = github_slug(repo)
    return f"io.github.{slug[0]}/{slug[1]}" if slug else f"io.github.OWNER/{NAME}"


def mcpb_file_name(version: str) -> str:
    return f"{NAME}-{version}.mcpb"


def mcpb_release_url(repo: str | None, version: str) -> str | None:
    """Where the .mcpb is expected as a GitHub release asset (tag v<version>); None without a GitHub repository."""
    slug = github_slug(repo)
    if not slug:
        return None
    return f"https://github.com/{slug[0]}/{slug[1]}/releases/download/v{version}/{mcpb_file_name(version)}"


def tool_entries(app: Path = ROOT / "server" / "app.py") -> list[dict[str, str]]:
    """The MCP tools server/app.py defines - every function decorated with `@tool(...)`, in source order - with the
    first paragraph of its docstring (the server's own description, shortened for the install dialog). Read with
    `ast`, so building a bundle imports nothing of the server."""
    tree = ast.parse(app.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        decorated = any(isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "tool"
                        for d in node.decorator_list)
        if decorated:
            doc = inspect.cleandoc(ast.get_docstring(node) or "")
            first = " ".join(doc.split("\n\n")[0].split())
            found.append((node.lineno, {"name": node.name, "description": first}))
    return [entry for _, entry in sorted(found, key=lambda pair: pair[0])]


def _author(proj: dict) -> dict[str, str]:
    for person in proj.get("authors") or []:
        if person.get("name"):
            return {k: person[k] for k in ("name", "email") if person.get(k)}
    return {"name": f"{NAME} contributors"}


LONG_DESCRIPTION = f"""\
Transcribes speech in audio and video files **on your computer**: audio and transcripts never leave it. \
It runs FunAudioLLM's Fun-ASR-Nano (a SAN-M audio encoder and Qwen3-0.6B, about 830M parameters) with MLX: \
on the GPU of an Apple Silicon Mac, on the CPU (or a CUDA GPU) on Linux.

- **Files**: wav, mp3, m4a, flac, ogg, opus, webm, mp4 and more, from the folders you choose below only.
- **Languages**: the default model ({DEFAULT_MODEL}) covers Chinese (with dialects), English and Japanese; \
the MLT variant ({MLT_MODEL}) covers 31 languages. `language="auto"` detects the language.
- **Long audio** is split on speech pauses and decoded in batches; a call that takes longer than about 45 s \
answers with a job id, and `get_transcript` fetches the result.
- **URLs** (optional): `transcribe_url` downloads a direct link to an audio file, public addresses only by \
default; set the URL policy to `off` to remove the tool.

The first start installs the Python dependencies with uv and downloads the model from Hugging Face (about \
2 GB); later starts reuse both. Apache-2.0; the model weights have their own licence (see the model card)."""


def manifest(proj: dict, repo: str | None = None, root: Path = ROOT) -> dict:
    """manifest.json (MCPB spec 0.4) for this project."""
    version = proj["version"]
    data: dict = {
        "manifest_version": MANIFEST_VERSION,
        "name": NAME,
        "display_name": DISPLAY_NAME,
        "version": version,
        "description": DESCRIPTION,
        "long_description": LONG_DESCRIPTION,
        "author": _author(proj),
    }
    if repo:
        data["repository"] = {"type": "git", "url": repo}
        data["homepage"] = repo
        if github_slug(repo):
            data["support"] = f"{repo}/issues"
    data.update({
        "icon": "icon.png",
        "server": {
            "type": "uv",
            "entry_point": ENTRY,
            "mcp_config": {
                "command": "uv",
                "args": ["run", "--project", "${__dirname}", "python", "${__dirname}/" + ENTRY,
                         "--", "${user_config.allowed_directories}"],
                "env": {
                    "FUNASR_NANO_MCP_MODEL": "${user_config.model}",
                    "FUNASR_NANO_MCP_QUANTIZE": "${user_config.quantization}",
                    "FUNASR_NANO_MCP_URL_POLICY": "${user_config.url_policy}",
                    "FUNASR_NANO_MCP_URL_ALLOW_HOSTS": "${user_config.url_allow_hosts}",
                },
            },
        },
        "tools": tool_entries(root / "server" / "app.py"),
        "tools_generated": False,
        "prompts_generated": False,
        "keywords": list(KEYWORDS),
        "license": proj.get("license") if isinstance(proj.get("license"), str) else "Apache-2.0",
        "compatibility": {
            "platforms": list(PLATFORMS),
            "runtimes": {"python": proj.get("requires-python", ">=3.10")},
        },
        "user_config": {
            "allowed_directories": {
                "type": "directory",
                "title": "Folders it may read",
                "description": "transcribe_file reads audio and video only inside these folders (and their "
                               "subfolders, hidden ones excepted). Pick the folders that hold your recordings.",
                "multiple": True,
                "required": True,
                "default": ["${HOME}"],
            },
            "model": {
                "type": "string",
                "title": "Model",
                "description": f"Hugging Face repo id or local model folder. {DEFAULT_MODEL} (default): Chinese "
                               f"with dialects, English and Japanese. {MLT_MODEL}: the multilingual (MLT) "
                               "variant, 31 languages. Downloaded once, about 2 GB.",
                "required": False,
                "default": DEFAULT_MODEL,
            },
            "quantization": {
                "type": "string",
                "title": "Quantization (none, 8 or 4)",
                "description": "Quantize the language model's weights: none (default), 8 or 4 bits. Fewer bits "
                               "use less memory, at some cost in accuracy; on a Linux CPU quantized weights are "
                               "slower, so keep none there.",
                "required": False,
                "default": "none",
            },
            "url_policy": {
                "type": "string",
                "title": "URL policy (public, allowlist, any or off)",
                "description": "What transcribe_url may download: public (default) - public internet addresses "
                               "only; allowlist - only the hosts listed below; any - also private and local "
                               "network addresses; off - no URL tool at all.",
                "required": False,
                "default": "public",
            },
            "url_allow_hosts": {
                "type": "string",
                "title": "Allowed URL hosts",
                "description": "Comma-separated host names or IP addresses that transcribe_url may reach even "
                               "on a private address (with the allowlist policy: the only ones). Empty by default.",
                "required": False,
                "default": "",
            },
        },
    })
    return data


REGISTRY_ENV = (
    ("FUNASR_NANO_MCP_ALLOWED_ROOTS", "Folders transcribe_file may read, separated by ':' (default: your home "
     "folder)", None, None, "/Users/me/Music:/Users/me/Downloads"),
    ("FUNASR_NANO_MCP_MODEL", f"Model: a Hugging Face repo id or a local folder. {MLT_MODEL} is the multilingual "
     "(MLT) variant for 31 languages", DEFAULT_MODEL, None, None),
    ("FUNASR_NANO_MCP_QUANTIZE", "Quantize the language model to 8 or 4 bits (less memory), or none",
     "none", list(QUANTIZATION_CHOICES), None),
    ("FUNASR_NANO_MCP_URL_POLICY", "What transcribe_url may download: public addresses only, listed hosts only "
     "(allowlist), any address, or off (no URL tool)", "public", list(URL_POLICIES), None),
    ("FUNASR_NANO_MCP_URL_ALLOW_HOSTS", "Comma-separated hosts transcribe_url may reach even on a private address",
     None, None, "nas.local,192.168.1.20"),
    ("FUNASR_NANO_MCP_BACKEND", "What computes: auto, mlx (Apple Silicon), cpu (Linux) or cuda", "auto",
     ["auto", "mlx", "cpu", "cuda"], None),
)


def server_json(proj: dict, repo: str | None = None, mcpb_sha256: str | None = None) -> dict:
    """server.json for the MCP Registry: the PyPI package (run with uvx), plus the .mcpb release asset when the
    repository is on GitHub and the bundle's SHA-256 is known."""
    version = proj["version"]
    env = []
    for name, description, default, choices, placeholder in REGISTRY_ENV:
        item: dict = {"name": name, "description": description, "isRequired": False, "format": "string"}
        if default is not None:
            item["default"] = default
        if choices:
            item["choices"] = choices
        if placeholder:
            item["placeholder"] = placeholder
        env.append(item)
    data: dict = {
        "$schema": REGISTRY_SCHEMA,
        "name": registry_name(repo),
        "title": DISPLAY_NAME,
        "description": REGISTRY_DESCRIPTION,
        "version": version,
    }
    slug = github_slug(repo)
    if repo and slug:
        data["repository"] = {"url": repo, "source": "github"}
    if repo:
        data["websiteUrl"] = repo
    data["packages"] = [{
        "registryType": "pypi",
        "identifier": proj["name"],
        "version": version,
        "runtimeHint": "uvx",
        "transport": {"type": "stdio"},
        "environmentVariables": env,
    }]
    url = mcpb_release_url(repo, version)
    if url and mcpb_sha256:
        data["packages"].append({
            "registryType": "mcpb",
            "identifier": url,
            "version": version,
            "fileSha256": mcpb_sha256,
            "transport": {"type": "stdio"},
        })
    return data


def stage(dest: Path, proj: dict, repo: str | None = None, root: Path = ROOT) -> Path:
    """Lay out the bundle's folder in `dest` (emptied first) and write its manifest.json; returns the manifest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / pkg, ignore=SKIP)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, dest / name)
    for pattern in NOTICE_GLOBS:
        for f in sorted(root.glob(pattern)):
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    shutil.copy2(root / "packaging" / ENTRY, dest / ENTRY)
    shutil.copy2(root / ICON.relative_to(ROOT), dest / "icon.png")
    path = dest / "manifest.json"
    path.write_text(json.dumps(manifest(proj, repo, root), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def npx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`npx -y @anthropic-ai/mcpb@<pinned> ARGS...`, output captured."""
    exe = shutil.which("npx")
    if exe is None:
        raise RuntimeError("npx is not on PATH: install Node.js (it brings npx) to validate and pack the bundle")
    return subprocess.run([exe, "-y", MCPB_PACKAGE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def validate(manifest_path: Path) -> subprocess.CompletedProcess:
    return npx("validate", str(manifest_path))


def pack(folder: Path, out_file: Path) -> subprocess.CompletedProcess:
    return npx("pack", str(folder), str(out_file))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, repo: str | None = None, do_pack: bool = True, root: Path = ROOT) -> dict[str, Path]:
    """Stage, validate and pack the bundle, then write server.json; returns the paths written."""
    proj = project(root)
    repo = repository_url(proj, repo)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "bundle"
    manifest_path = stage(folder, proj, repo, root)
    written = {"manifest": manifest_path, "folder": folder}
    if do_pack:
        target = out / mcpb_file_name(proj["version"])
        for step, run in (("validate", lambda: validate(manifest_path)), ("pack", lambda: pack(folder, target))):
            result = run()
            if result.returncode != 0:
                raise RuntimeError(f"mcpb {step} failed:\n{result.stdout}{result.stderr}")
        written["mcpb"] = target
    digest = sha256(written["mcpb"]) if "mcpb" in written else None
    server_path = out / "server.json"
    server_path.write_text(json.dumps(server_json(proj, repo, digest), indent=2) + "\n", encoding="utf-8")
    written["server_json"] = server_path
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    ap.add_argument("--repository", help="source repository URL, e.g. https://github.com/OWNER/funasr-nano-mlx "
                    "(default: pyproject's [project.urls] Repository)")
    ap.add_argument("--no-pack", action="store_true", help="only stage the folder and write server.json")
    args = ap.parse_args(argv)
    written = build(args.out, args.repository, do_pack=not args.no_pack)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    proj = project()
    repo = repository_url(proj, args.repository)
    if not github_slug(repo):
        print(f"note: no GitHub repository known, so server.json is named {registry_name(repo)!r} and lists no "
              ".mcpb asset; pass --repository or set [project.urls] Repository before publishing", file=sys.stderr)
    if not any(f.is_file() for pattern in NOTICE_GLOBS for f in ROOT.glob(pattern)):
        print("note: no LICENSE file at the repository root, so the bundle carries none", file=sys.stderr)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if not re.search(r"mcp-name:\s*" + re.escape(registry_name(repo)), readme):
        print(f"note: README.md lacks 'mcp-name: {registry_name(repo)}', which the Registry needs to verify the "
              "PyPI package", file=sys.stderr)


if __name__ == "__main__":
    main()
