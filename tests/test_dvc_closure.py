"""dvc.yaml's code deps: every stage depends on all the project code its command runs, so `dvc repro`
reruns a stage when any of it changes.

For each stage (``foreach`` stages expanded), the command ``python -m flows.<x>`` is followed through
its imports, transitively: ``import`` and ``from ... import`` anywhere in a module (inside functions
too), relative imports, packages (their ``__init__`` and each submodule imported), and a
``"-m", "crossdiff_core.<x>"`` pair in a command list (a module a stage launches, e.g. under torchrun).
A package's data files (files other than Python under its directory, e.g. a report template) belong
to it. A dep on a directory covers everything under it. Only the project's own packages count."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("crossdiff_core", "tasks", "flows")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file under ``root`` that defines module ``name`` (a package's ``__init__.py``), or None."""
    base = root.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def module_name(f: Path, root: Path = REPO) -> str:
    parts = f.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs every package above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(f: Path, root: Path = REPO) -> set[str]:
    """The project modules ``f`` imports (candidates that are no module, e.g. a class, drop out later)."""
    tree = ast.parse(f.read_text(), filename=str(f))
    name = module_name(f, root)
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.update(_with_parents(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.update(_with_parents(mod))
            names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, (ast.List, ast.Tuple)):  # [..., "-m", "crossdiff_core.distributed", ...]
            vals = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for a, v in zip(vals, vals[1:]):
                if a == "-m" and isinstance(v, str):
                    names.update(_with_parents(v))
    return {n for n in names if n.split(".")[0] in PROJECT}


def package_data(f: Path) -> set[Path]:
    """Non-Python files of the package whose ``__init__.py`` is ``f`` (not those of its sub-packages)."""
    out = set()
    for p in f.parent.rglob("*"):
        if not p.is_file() or p.suffix in (".py", ".pyc") or "__pycache__" in p.parts:
            continue
        owner = p.parent
        while owner != f.parent and not (owner / "__init__.py").is_file():
            owner = owner.parent
        if owner == f.parent:
            out.add(p)
    return out


def closure(module: str, root: Path = REPO) -> set[Path]:
    """Every project file that running ``python -m module`` imports (and its packages' data files)."""
    seen: set[Path] = set()
    todo = _with_parents(module)
    names: set[str] = set()
    while todo:
        name = todo.pop()
        if name in names:
            continue
        names.add(name)
        f = module_file(name, root)
        if f is None or f in seen:
            continue
        seen.add(f)
        if f.name == "__init__.py":
            seen |= package_data(f)
        todo.extend(imported_modules(f, root) - names)
    return seen


def _substitute(s: str, key: str | None, item) -> str:
    if key is not None:
        s = s.replace("${key}", str(key))
    if isinstance(item, str):
        s = s.replace("${item}", item)
    return s


def stages() -> dict[str, dict]:
    """``{stage name: {"cmd", "deps"}}`` with ``foreach`` stages expanded (``name@key``)."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    variables: dict = {}
    for v in doc.get("vars", []):
        if isinstance(v, dict):
            variables.update(v)
    out = {}
    for name, st in doc["stages"].items():
        if "foreach" in st:
            spec = st["foreach"]
            items = variables[spec[2:-1]] if isinstance(spec, str) and spec.startswith("${") else spec
            pairs = items.items() if isinstance(items, dict) else ((i, i) for i in items)
            for key, item in pairs:
                do = st["do"]
                out[f"{name}@{key}"] = {"cmd": _substitute(do["cmd"], key, item),
                                        "deps": [_substitute(d, key, item) for d in do.get("deps", [])]}
        else:
            out[name] = {"cmd": st["cmd"], "deps": list(st.get("deps", []))}
    return out


def command_module(cmd: str) -> str:
    words = shlex.split(cmd)
    assert "-m" in words, f"{cmd!r}: expected `python -m flows.<stage> ...`"
    return words[words.index("-m") + 1]


def covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d + "/") for d in (d.rstrip("/") for d in deps))


STAGES = stages()


def test_the_closure_follows_every_kind_of_import(tmp_path):
    files = {
        "flows/__init__.py": "import tasks\n",
        "flows/x.py": "from flows import common\nCMD = ['torchrun', '-m', 'crossdiff_core.launched', '--x']\n",
        "flows/common.py": "def f():\n    import crossdiff_core.a\n",
        "flows/unused.py": "",
        "tasks/__init__.py": "import os\n",
        "crossdiff_core/__init__.py": "",
        "crossdiff_core/a.py": "from .b import X\nfrom .sub import c\nimport numpy\n",
        "crossdiff_core/b.py": "X = 1\n",
        "crossdiff_core/sub/__init__.py": "from .. import errors\n",
        "crossdiff_core/sub/c.py": "from ..sub.d import *\n",
        "crossdiff_core/sub/d.py": "",
        "crossdiff_core/sub/templates/page.j2": "{{ x }}",
        "crossdiff_core/sub/other/__init__.py": "",  # a sub-package nobody imports: not the data of sub
        "crossdiff_core/sub/other/data.txt": "",
        "crossdiff_core/errors.py": "",
        "crossdiff_core/launched.py": "",
        "crossdiff_core/unused.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = {f.relative_to(tmp_path).as_posix() for f in closure("flows.x", tmp_path)}
    assert got == set(files) - {"flows/unused.py", "crossdiff_core/unused.py", "crossdiff_core/sub/other/__init__.py",
                                "crossdiff_core/sub/other/data.txt"}


def test_the_closure_of_a_real_stage():
    # flows.train reaches the trainer through tasks.training (a plain import inside a function), the
    # crosscoder through the trainer's relative import, and crossdiff_core.distributed through the
    # torchrun command list in tasks/training.py
    files = {f.relative_to(REPO).as_posix() for f in closure("flows.train")}
    assert {"flows/__init__.py", "flows/train.py", "flows/common.py", "tasks/training.py", "tasks/tracking.py",
            "crossdiff_core/__init__.py", "crossdiff_core/trainer.py", "crossdiff_core/crosscoder.py",
            "crossdiff_core/distributed.py"} <= files
    assert all(f.split("/")[0] in PROJECT for f in files)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_code(stage):
    st = STAGES[stage]
    module = command_module(st["cmd"])
    assert module_file(module) is not None, f"{stage}: {module} is not a project module"
    missing = sorted(f.relative_to(REPO).as_posix() for f in closure(module) if not covered(f, st["deps"]))
    assert not missing, (f"dvc.yaml stage {stage} runs `{module}`, which imports files its deps lack: "
                         f"{missing}; add them (or their package directory) to the stage's deps")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_exist(stage):
    code = [d for d in STAGES[stage]["deps"] if d.split("/")[0] in PROJECT]
    gone = [d for d in code if not (REPO / d).exists()]
    assert not gone, f"dvc.yaml stage {stage} depends on code that does not exist: {gone}; update its deps"
