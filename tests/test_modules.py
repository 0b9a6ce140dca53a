"""The architecture as the tree shows it: no two modules import each other, every module imports on
its own, ``iwae/`` never imports Ray, Typer or pyarrow, and only ``pipeline/ray_backend`` imports Ray."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("iwae", "pipeline", "jobs")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__main__.py":  # an entry point: importing it runs the command
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (resolved against the project's modules)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def project_imports() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path, name) if m in mods and m != name} for name, path in mods.items()}


def test_no_two_modules_import_each_other():
    """Not at the top, not inside a function: a pair that does means one of them belongs below the other."""
    graph = project_imports()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, set()) and not _package_of(a, b)})
    assert pairs == [], pairs


def _package_of(a: str, b: str) -> bool:
    """A package's ``__init__`` re-exporting its own submodule is not a circle."""
    return a.startswith(b + ".") or b.startswith(a + ".")


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports_on_its_own(name):
    """Imported first, with no other module of the project loaded before it. The modules loaded
    before are put back afterwards: the tests after this one must see the classes they imported
    (a second ``UserError`` class is not caught by the first one's ``except``)."""
    saved = {m: sys.modules.pop(m) for m in [m for m in sys.modules if m.split(".")[0] in PACKAGES]}
    try:
        importlib.import_module(name)
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[m]
        sys.modules.update(saved)


def test_the_science_never_imports_ray_typer_or_pyarrow_and_only_the_backend_imports_ray():
    graph = {name: imports(path, name) for name, path in modules().items()}
    for name, deps in graph.items():
        top = {d.split(".")[0] for d in deps}
        if name.startswith("iwae"):
            assert not top & {"ray", "typer", "pyarrow"}, (name, top & {"ray", "typer", "pyarrow"})
        if not name.startswith("pipeline.ray_backend"):
            assert "ray" not in top, name


def test_only_the_store_opens_a_filesystem():
    """Every read and write of a results location goes through pipeline/store/: no other module of
    the product imports pyarrow.fs, s3fs or gcsfs (it would bypass the store's retry rule and layout)."""
    clients = {"pyarrow.fs", "s3fs", "gcsfs", "gcsfs.core"}
    for name, path in modules().items():
        if name.startswith("pipeline.store"):
            continue
        found = imports(path, name) & clients
        assert not found, (name, found)
