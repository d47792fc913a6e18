"""The import graph keeps the layers of docs/architecture.md: a module imports only its own layer
and those below it, and nothing imports the CLI. Read from the source (every ``import``, also
those inside functions), so a shortcut taken anywhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package name (pyproject's package-dir)
SOURCES = {"fedsecmem": "fedsecmem", "crypto": "fedsecmem.crypto", "protocols": "fedsecmem.protocols",
           "audits": "fedsecmem.audits"}
# lowest first; a module may import its own layer and the layers listed as below it
LAYERS = {
    "crypto": ("fedsecmem.crypto",),
    "protocols": ("fedsecmem.protocols",),
    "audits": ("fedsecmem.audits",),
    "foundation": ("fedsecmem", "fedsecmem.errors", "fedsecmem.progress", "fedsecmem.methods", "fedsecmem.config",
                   "fedsecmem.provenance"),
    "data": ("fedsecmem.data",),
    "detector": ("fedsecmem.detector",),
    "privacy": ("fedsecmem.privacy",),
    "method": ("fedsecmem.method",),
    "baselines": ("fedsecmem.baselines",),
    "model": ("fedsecmem.model",),
    "run": ("fedsecmem.run",),
    "deployment": ("fedsecmem.deployment",),
    "cli": ("fedsecmem.cli", "fedsecmem.__main__", "fedsecmem.api"),
}
BELOW = {
    "crypto": set(),
    "protocols": {"crypto"},
    "audits": {"crypto"},
    "foundation": {"crypto", "protocols"},  # the config checks protocol settings (SecAgg+ graph bounds)
    "data": {"foundation"},
    "detector": {"foundation", "data"},
    "privacy": {"foundation", "crypto", "protocols", "audits"},
    "method": {"foundation", "crypto", "protocols", "audits", "data", "detector", "privacy"},
    "baselines": {"foundation", "crypto", "protocols", "audits", "data", "detector", "privacy", "method"},
    "model": {"foundation", "crypto", "protocols", "audits", "data", "detector", "privacy", "method", "baselines"},
    "run": {"foundation", "crypto", "protocols", "audits", "data", "detector", "privacy", "method", "baselines",
            "model"},
    "deployment": {"foundation", "crypto", "protocols", "audits", "data", "detector", "privacy", "method",
                   "baselines", "model", "run"},
    "cli": set(LAYERS) - {"cli"},
}


def layer_of(module: str) -> str | None:
    best, length = None, -1
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            exact_only = p == "fedsecmem"  # the package itself (its __version__), not everything under it
            if (module == p or (not exact_only and module.startswith(p + "."))) and len(p) > length:
                best, length = layer, len(p)
    return best


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue  # generated protobuf code
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith(
                "import_module") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)  # importlib.import_module("fedsecmem....") is an import too
    return {m for m in found if m == "fedsecmem" or m.startswith("fedsecmem.")}


# The public API's two lazy entry points (docs/api.md): ``fedsecmem.Detector`` and the callable
# ``fedsecmem.run(...)`` load ``fedsecmem.api`` on first use; nothing else below the CLI may.
API_HOOKS = {"fedsecmem": {"fedsecmem.api", "fedsecmem.run"}, "fedsecmem.run": {"fedsecmem.api"}}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer (add them to docs/architecture.md and LAYERS): {unplaced}"


def test_no_module_imports_a_higher_layer_or_the_cli():
    known = modules()
    broken = []
    for module, path in known.items():
        mine = layer_of(module)
        for imported in sorted(imports_of(path, module)):
            if imported not in known and imported.rpartition(".")[0] in known:
                imported = imported.rpartition(".")[0]  # `from module import name`
            theirs = layer_of(imported)
            if theirs is None or theirs == mine or imported in API_HOOKS.get(module, ()):
                continue
            if theirs not in BELOW[mine]:
                broken.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not broken, "layering broken:\n" + "\n".join(broken)


@pytest.mark.parametrize("source, expected", [
    ("from fedsecmem.run.runner import run\n", "run"),
    ("def f():\n    from fedsecmem.cli import main\n", "cli"),
    ("import importlib\nimportlib.import_module('fedsecmem.cli')\n", "cli"),
])
def test_the_layering_check_sees_imports_anywhere_in_a_module(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = imports_of(path, "fedsecmem.detector.probe")
    assert any(layer_of(m) == expected for m in found)  # a detector module doing this would fail above
