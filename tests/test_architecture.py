"""The shape of the code, checked: imports go one way (audio -> model -> decode -> backends -> pipeline -> loading ->
cli and server) with no cycle; the model is pure MLX (it never asks which device it runs on); backends do not import
each other except the reference (mlx); switches are not read from the environment at import time; tests do not
patch the package's module globals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("asr", "server")
# rank of each part of the pipeline: a module may import modules of its own rank or below
RANKS = [
    ("asr.errors", 0), ("asr.types", 0), ("asr.languages", 0), ("asr.options", 0), ("asr.writers", 0),
    ("asr.audio", 1), ("asr.model", 2), ("asr.decode", 3), ("asr.backends", 4), ("asr.pipeline", 5),
    ("asr.loading", 6), ("asr.batch", 6), ("asr.batch_ray", 6), ("asr.speaker", 2), ("asr.cli", 7), ("server", 7),
]


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (f, package)
    return found


def imports(name: str, path: Path, package: bool, known: set[str]) -> set[str]:
    """The package modules `name` imports, at module level or inside functions."""
    here = name if package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = ((base + "." + node.module) if node.module else base) if node.level else node.module
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, f, pkg, set(mods)) for name, (f, pkg) in mods.items()}


def rank(name: str) -> int | None:
    return next((r for prefix, r in RANKS if name == prefix or name.startswith(prefix + ".")), None)


def test_every_module_has_a_place(graph):
    assert [m for m in graph if m != "asr" and rank(m) is None] == []


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components over every import (a package importing its own children, or a child
    its parent package, does not count: that is how packages are assembled)."""
    def deps(v: str) -> set[str]:
        return {w for w in graph[v] if not v.startswith(w + ".") and not w.startswith(v + ".")}

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in deps(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_go_one_way(graph):
    """No module imports a later stage of the pipeline (the package's facade, `asr`, may import anything: it loads
    the CPU BLAS and the CUDA settings before MLX and offers load_model)."""
    upward = [(m, d) for m, deps in graph.items() if m != "asr" for d in deps
              if d != "asr" and rank(d) > rank(m)]
    assert upward == []


def test_backends_import_only_the_reference(graph):
    """A backend may build on the reference backend (mlx), never on another one; only `select` sees them all."""
    def backend(name: str) -> str | None:
        parts = name.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "backends" and parts[2] != "select" else None

    crossing = [(m, d) for m, deps in graph.items() for d in deps
                if backend(m) and backend(d) and backend(d) not in (backend(m), "mlx")]
    assert crossing == []
    assert [m for m, deps in graph.items() if "asr.backends.select" in deps and not m.startswith("asr.loading")] == []


def test_the_model_is_pure_mlx():
    """asr.model never asks which device it runs on: device work is a backend's, passed in as an argument."""
    device_queries = ("default_device", "mx.cpu", "mx.gpu", "mx.cuda", "mx.metal", "numpy")
    offenders = [(f.name, q) for f in sorted((ROOT / "asr" / "model").glob("*.py"))
                 for q in device_queries if q in f.read_text(encoding="utf-8") and not (
                     q == "numpy" and f.name in ("llm.py", "ctc.py"))]  # RoPE tables, CTC alignment: host math
    assert offenders == []


def test_no_switches_read_from_the_environment():
    """The environment is read in few places: RuntimeOptions.from_env (the options users set), the BLAS and MLX
    settings that must precede MLX's import, the model cache, and facts of the process (an MPS share, Numba's
    threading layer). Anything else would be a hidden switch."""
    allowed = {"asr/options.py", "asr/backends/cpu/blas_load.py", "asr/backends/cuda/env.py",
               "asr/backends/cuda/kernels.py", "asr/backends/cpu/gemv.py", "asr/loading/checkpoint.py",
               "asr/cli.py", "server/config.py",
               "asr/batch_ray.py"}  # forwards FUNASR_NANO_*/HF_*/MLX_* to the Ray workers' environment
    readers = {str(f.relative_to(ROOT)) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")
               if "os.environ" in f.read_text(encoding="utf-8") or "getenv(" in f.read_text(encoding="utf-8")}
    assert readers <= allowed, readers - allowed


def test_tests_do_not_patch_module_globals():
    """Runners, kernels, BLAS libraries, devices and download folders are chosen through options and constructor
    arguments, so no test replaces a module global or a class attribute, ours or a library's (monkeypatch.setattr
    on an imported module or class, or on a dotted "module.name" string)."""
    ours = set(modules())
    offenders = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        aliases = {}  # local name -> the module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "setattr" and node.args):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and "." in first.value:
                offenders.append(f"{f.name}:{node.lineno} {first.value!r}")  # monkeypatch.setattr("mod.name", v)
            elif isinstance(first, ast.Name | ast.Attribute):
                target = ast.unparse(first)
                head, _, rest = target.partition(".")
                full = aliases.get(head, head) + ("." + rest if rest else "")
                if head in aliases or full in ours or full.split(".")[0] in PACKAGES:
                    offenders.append(f"{f.name}:{node.lineno} {target}")
    assert offenders == []


def test_every_data_file_of_the_package_is_installed():
    """Files the package reads at run time that are not Python (VAD weights, CUDA kernel sources) are listed in
    pyproject's package-data, so a wheel install has them too, not only a checkout."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for pkg in PACKAGES:
        globs = package_data.get(pkg, [])
        data = {p.relative_to(ROOT / pkg) for p in (ROOT / pkg).rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc", ".nbi", ".nbc") and "__pycache__" not in p.parts
                and "node_modules" not in p.parts and "src" not in p.parts
                and p.name not in ("package.json", "package-lock.json")}
        covered = {p for p in data if any(p.match(g) for g in globs)}
        assert covered == data, (pkg, sorted(map(str, data - covered)))
