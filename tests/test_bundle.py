"""The one-click install artefacts of tools/bundle.py, checked with the official tools.

- manifest.json passes `mcpb validate` of @anthropic-ai/mcpb (pinned in tools/bundle.py, run through npx), and the
  same validator rejects a manifest missing a required field;
- `mcpb pack` builds a .mcpb whose zip holds the manifest, icon, launcher, pyproject.toml, README and every source
  file of asr/ and server/, and nothing of .venv, tests, .git, caches or dist;
- server.json validates against the MCP Registry's server.json schema (vendored with its provenance in
  tests/fixtures/mcp_registry/, SHA-256 checked), which rejects a broken one;
- user_config reaches the server: the manifest's command is rendered by mcpb's own getMcpConfigForManifest (the
  substitution Claude Desktop uses) and the result goes through the bundle's launcher into
  server.config.load_settings, which must yield the chosen folders, model, quantization and URL policy.

Everything skips when npx (Node.js) is not on PATH; the first run downloads the pinned CLI once into npm's cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import jsonschema
import pytest

from server.config import ConfigError, UrlPolicy, load_settings
from tools import bundle

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "tests" / "fixtures" / "mcp_registry" / "server-2025-12-11.schema.json"
SCHEMA_SHA256 = "3fba09590c99f61735d234822279f4223fab9e300c0a81e81c91ab62a4114de0"
REPO = "https://github.com/example-owner/funasr-nano-mlx"
EXPECTED_TOOLS = {"transcribe_file", "transcribe_url", "get_transcript", "cancel_transcription", "list_languages",
                  "server_status"}

pytestmark = pytest.mark.skipif(shutil.which("npx") is None,
                                reason="npx (Node.js) is not on PATH: the official @anthropic-ai/mcpb CLI runs "
                                       "through it")

# getMcpConfigForManifest of the pinned @anthropic-ai/mcpb, loaded from the package npx installed: argv[2] is the
# `mcpb` executable npx put on PATH, argv[3] a JSON file with the function's options
RENDER_JS = """
import { readFileSync, realpathSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
const [cli, input] = process.argv.slice(2);
const pkg = dirname(dirname(dirname(realpathSync(cli))));
const { getMcpConfigForManifest } = await import(pathToFileURL(join(pkg, "dist", "shared", "config.js")).href);
const version = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8")).version;
const config = await getMcpConfigForManifest(JSON.parse(readFileSync(input, "utf8")));
process.stdout.write(JSON.stringify({ version, config: config ?? null }));
"""


def _launcher():
    """packaging/mcpb_entry.py as a module (it is a script in the bundle's root, not part of a package)."""
    spec = importlib.util.spec_from_file_location("funasr_mcpb_entry", ROOT / "packaging" / "mcpb_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """dist/ as `python -m tools.bundle --repository REPO` writes it (validate + pack with the pinned CLI)."""
    return bundle.build(tmp_path_factory.mktemp("dist"), REPO)


@pytest.fixture(scope="module")
def manifest(built) -> dict:
    return json.loads(built["manifest"].read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def registry_validator():
    data = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SCHEMA_SHA256, "the vendored schema changed: see its PROVENANCE.md"
    schema = json.loads(data)
    assert schema["$id"] == bundle.REGISTRY_SCHEMA
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def _get_mcp_config(options: dict, tmp_path: Path) -> dict | None:
    """getMcpConfigForManifest(options) of the pinned mcpb package: None when it would start nothing."""
    (tmp_path / "render.mjs").write_text(RENDER_JS, encoding="utf-8")
    (tmp_path / "options.json").write_text(json.dumps(options), encoding="utf-8")
    result = subprocess.run(
        [shutil.which("npx"), "-y", "-p", bundle.MCPB_PACKAGE, "-c",
         f'node "{tmp_path / "render.mjs"}" "$(command -v mcpb)" "{tmp_path / "options.json"}"'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = json.loads(result.stdout)
    assert rendered["version"] == bundle.MCPB_CLI_VERSION
    return rendered["config"]


def _render(manifest: dict, bundle_dir: Path, user_config: dict, home: Path, tmp_path: Path) -> dict:
    """The MCP server config a host derives from the manifest and the user's answers, by mcpb's own code."""
    config = _get_mcp_config({
        "manifest": manifest, "extensionPath": str(bundle_dir), "userConfig": user_config, "pathSeparator": ":",
        "systemDirs": {"HOME": str(home), "DESKTOP": str(home / "Desktop"), "DOCUMENTS": str(home / "Documents"),
                       "DOWNLOADS": str(home / "Downloads")},
    }, tmp_path)
    assert config is not None, "mcpb found required configuration missing"
    return config


def _server_settings(config: dict, bundle_dir: Path, home: Path):
    """What the bundled server would run with: the rendered command through the launcher into load_settings."""
    assert config["command"] == "uv"
    entry = str(bundle_dir / bundle.ENTRY)
    assert config["args"][:5] == ["run", "--project", str(bundle_dir), "python", entry], config["args"]
    notes = []
    argv, env = _launcher().translate(config["args"][5:], config.get("env", {}), home=home, warn=notes.append)
    return load_settings(argv, env), notes


# ---- manifest.json and the .mcpb --------------------------------------------------------------------------------

def test_manifest_passes_the_official_validator(built, manifest):
    result = bundle.validate(built["manifest"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Manifest schema validation passes!" in result.stdout
    proj = bundle.project()
    assert manifest["manifest_version"] == "0.4" and manifest["server"]["type"] == "uv"
    assert (manifest["name"], manifest["version"], manifest["license"]) == (proj["name"], proj["version"],
                                                                            "Apache-2.0")
    assert manifest["compatibility"]["platforms"] == ["darwin", "linux"]
    assert manifest["compatibility"]["runtimes"]["python"] == proj["requires-python"]
    assert manifest["repository"] == {"type": "git", "url": REPO}


def test_the_validator_rejects_a_manifest_without_a_required_field(built, manifest, tmp_path):
    broken = {k: v for k, v in manifest.items() if k != "author"}
    (tmp_path / "manifest.json").write_text(json.dumps(broken), encoding="utf-8")
    shutil.copy2(built["folder"] / "icon.png", tmp_path / "icon.png")
    result = bundle.validate(tmp_path / "manifest.json")
    assert result.returncode != 0
    assert "author" in result.stdout + result.stderr


def test_manifest_lists_the_servers_tools(manifest):
    tools = {t["name"]: t["description"] for t in manifest["tools"]}
    assert EXPECTED_TOOLS <= set(tools)
    assert all(len(d) > 20 for d in tools.values()), tools


def test_pack_holds_the_server_and_nothing_else(built, manifest):
    mcpb = built["mcpb"]
    assert mcpb.name == f"funasr-nano-mlx-{manifest['version']}.mcpb"
    with zipfile.ZipFile(mcpb) as z:
        assert z.testzip() is None
        names = set(z.namelist())
        assert json.loads(z.read("manifest.json")) == manifest
        assert z.read("icon.png") == (ROOT / "packaging" / "icon.png").read_bytes()
        assert z.read(bundle.ENTRY) == (ROOT / "packaging" / "mcpb_entry.py").read_bytes()
        assert z.read("pyproject.toml") == (ROOT / "pyproject.toml").read_bytes()
    assert {"manifest.json", "icon.png", bundle.ENTRY, "pyproject.toml", "README.md",
            "asr/assets/silero_vad_16k.safetensors"} <= names
    sources = {p.relative_to(ROOT).as_posix() for pkg in ("asr", "server") for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources and sources <= names, sorted(sources - names)
    forbidden = (".venv", ".venv-ref", "tests", ".git", ".cache", "dist", "__pycache__", ".pytest_cache",
                 ".ruff_cache", ".hypothesis", "node_modules", "benchmarks", "tools", ".work", ".whl")
    leaked = sorted(n for n in names if set(n.split("/")[:-1]) & set(forbidden)
                    or n.endswith((".pyc", ".mcpb")) or ".egg-info/" in n)
    assert leaked == []


def test_icon_is_the_drawn_512px_png():
    data = (ROOT / "packaging" / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (512, 512)
    spec = importlib.util.spec_from_file_location("funasr_make_icon", ROOT / "packaging" / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    assert make_icon.png_bytes(make_icon.draw()) == data, "packaging/icon.png is stale: run packaging/make_icon.py"


# ---- server.json -------------------------------------------------------------------------------------------------

def test_server_json_validates_against_the_registry_schema(built, registry_validator):
    data = json.loads(built["server_json"].read_text(encoding="utf-8"))
    registry_validator.validate(data)
    proj = bundle.project()
    assert data["$schema"] == bundle.REGISTRY_SCHEMA
    assert data["name"] == "io.github.example-owner/funasr-nano-mlx" and data["version"] == proj["version"]
    pypi, mcpb = data["packages"]
    assert (pypi["registryType"], pypi["identifier"], pypi["version"], pypi["runtimeHint"]) == (
        "pypi", proj["name"], proj["version"], "uvx")
    assert pypi["transport"] == {"type": "stdio"}
    env = {e["name"]: e for e in pypi["environmentVariables"]}
    assert {"FUNASR_NANO_MCP_ALLOWED_ROOTS", "FUNASR_NANO_MCP_MODEL", "FUNASR_NANO_MCP_QUANTIZE",
            "FUNASR_NANO_MCP_URL_POLICY"} <= set(env)
    assert all(e["description"] for e in env.values())
    assert env["FUNASR_NANO_MCP_URL_POLICY"]["choices"] == list(typing.get_args(UrlPolicy))
    assert mcpb["registryType"] == "mcpb" and mcpb["transport"] == {"type": "stdio"}
    assert mcpb["identifier"] == f"{REPO}/releases/download/v{proj['version']}/{built['mcpb'].name}"
    assert mcpb["fileSha256"] == hashlib.sha256(built["mcpb"].read_bytes()).hexdigest()


def test_server_json_without_a_known_repository(registry_validator):
    data = bundle.server_json(bundle.project(), repo=None, mcpb_sha256="0" * 64)
    registry_validator.validate(data)
    assert data["name"] == "io.github.OWNER/funasr-nano-mlx"
    assert [p["registryType"] for p in data["packages"]] == ["pypi"]  # no release URL to point at


@pytest.mark.parametrize("breakage", [
    {"description": "x" * 101},
    {"name": "funasr-nano-mlx"},
    {"packages": [{"registryType": "pypi", "identifier": "funasr-nano-mlx", "version": "latest",
                   "transport": {"type": "stdio"}}]},
])
def test_the_registry_schema_rejects_a_broken_server_json(registry_validator, breakage):
    data = {**bundle.server_json(bundle.project(), REPO), **breakage}
    with pytest.raises(jsonschema.ValidationError):
        registry_validator.validate(data)


# ---- user_config -> server settings ------------------------------------------------------------------------------

def test_user_config_reaches_the_server(built, manifest, tmp_path):
    home = tmp_path / "home"
    music, talks = home / "Music", tmp_path / "shared talks"
    config = _render(manifest, built["folder"], {
        "allowed_directories": [str(music), str(talks)],
        "model": bundle.MLT_MODEL,
        "quantization": "8",
        "url_policy": "allowlist",
        "url_allow_hosts": "nas.local, 10.0.0.5",
    }, home, tmp_path)
    assert config["args"][-3:] == ["--", str(music), str(talks)]  # one argument per chosen folder
    settings, notes = _server_settings(config, built["folder"], home)
    assert settings.allowed_roots == (music, talks)
    assert settings.model == bundle.MLT_MODEL
    assert settings.quantize == 8
    assert settings.url_policy == "allowlist"
    assert settings.url_allow_hosts == ("nas.local", "10.0.0.5")
    assert notes == []


def test_defaults_reach_the_server(built, manifest, tmp_path):
    """Only the required folder picker answered, with its default kept verbatim (`${HOME}`, as Claude Desktop
    stores it): every other setting comes from the manifest's defaults."""
    home = tmp_path / "home"
    config = _render(manifest, built["folder"], {"allowed_directories": manifest["user_config"]
                     ["allowed_directories"]["default"]}, home, tmp_path)
    settings, notes = _server_settings(config, built["folder"], home)
    assert settings.allowed_roots == (home,)
    assert settings.model == bundle.DEFAULT_MODEL
    assert settings.quantize is None
    assert settings.url_policy == "public"
    assert settings.url_allow_hosts == ()
    assert notes == []


def test_a_host_without_the_required_folders_starts_nothing(built, manifest, tmp_path):
    """allowed_directories is required: until the user confirms folders, mcpb yields no command to run."""
    assert _get_mcp_config({"manifest": manifest, "extensionPath": str(built["folder"]), "userConfig": {},
                            "pathSeparator": ":", "systemDirs": {"HOME": str(tmp_path)}}, tmp_path) is None


@pytest.mark.parametrize("quantization, expected", [("none", None), ("8", 8), ("4", 4), ("", None)])
def test_every_quantization_choice_is_a_server_value(quantization, expected):
    assert quantization == "" or quantization in bundle.QUANTIZATION_CHOICES
    assert load_settings([], {"FUNASR_NANO_MCP_QUANTIZE": quantization}).quantize == expected


def test_the_choices_offered_are_the_servers():
    assert bundle.URL_POLICIES == typing.get_args(UrlPolicy)
    with pytest.raises(ConfigError):
        load_settings([], {"FUNASR_NANO_MCP_QUANTIZE": "6"})


def test_the_launcher_drops_unfilled_placeholders(tmp_path):
    """A host that leaves `${user_config.x}` or `${HOME}` in place must not hand the server a literal placeholder."""
    notes = []
    argv, env = _launcher().translate(
        ["--log-level", "${user_config.log_level}", "--", "${HOME}/Music", "${DOCUMENTS}", "${user_config.extra}"],
        {"FUNASR_NANO_MCP_MODEL": "${user_config.model}", "FUNASR_NANO_MCP_URL_POLICY": "off", "PATH": "/bin"},
        home=tmp_path, warn=notes.append)
    assert argv == ["--allowed-root", str(tmp_path / "Music"), "--allowed-root", str(tmp_path / "Documents")]
    assert env == {"FUNASR_NANO_MCP_URL_POLICY": "off", "PATH": "/bin"}
    assert len(notes) == 3
    settings = load_settings(argv, env)
    assert settings.model is None and settings.url_policy == "off"
    assert settings.allowed_roots == (tmp_path / "Music", tmp_path / "Documents")


def test_the_bundled_launcher_starts_the_bundled_server(built, tmp_path):
    """`python <bundle>/mcpb_entry.py` imports the server from the bundle itself (what `uv run` executes)."""
    result = subprocess.run([sys.executable, str(built["folder"] / bundle.ENTRY), "--version", "--", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"funasr-nano-mcp {bundle.project()['version']}" in result.stderr
