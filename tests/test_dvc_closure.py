"""dvc.yaml's code deps: every stage depends on all the project code its command runs, so `dvc repro`
reruns a stage when any of it changes.

For each stage (``foreach`` stages expanded), the command ``python -m flows.<x>`` is followed through
its imports, transitively: ``import`` and ``from ... import`` anywhere in a module (inside functions
too), relative imports, packages (their ``__init__`` and each submodule imported), and a
``"-m", "crossdiff_core.<x>"`` pair in a command list (a module a stage launches, e.g. under torchrun).
A package's data files (files other than Python under its directory, e.g. a report template) belong
to it. A dep on a directory covers everything under it. Only the project's own packages count.

A failing test prints the code deps the stage needs (:func:`code_deps`), ready to paste into dvc.yaml:
a package below the top level that the stage imports whole is one directory dep, the rest are files."""

from __future__ import annotations

import ast
import functools
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


def _files_under(d: Path) -> set[Path]:
    """The files DVC hashes for a directory dep on ``d`` (.dvcignore leaves bytecode out)."""
    return {p for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def code_deps(files: set[Path] | frozenset[Path], root: Path = REPO) -> list[str]:
    """The shortest dvc.yaml deps list that covers exactly ``files``: each package below the top level
    whose every file is in ``files`` becomes one directory dep (outermost first), the rest stay files."""
    files = set(files)
    packages = sorted({a for f in files for a in f.parents
                       if a != root and a.parent != root and root in a.parents and (a / "__init__.py").is_file()},
                      key=lambda a: (len(a.parts), a))
    dirs: list[Path] = []
    for d in packages:
        if not any(u in d.parents for u in dirs) and _files_under(d) <= files:
            dirs.append(d)
    rest = [f for f in files if not any(u in f.parents for u in dirs)]
    return sorted(d.relative_to(root).as_posix() for d in dirs) + sorted(f.relative_to(root).as_posix() for f in rest)


def _paste(stage: str, module: str) -> str:
    """The deps lines to paste into dvc.yaml for ``stage`` (its non-code deps, e.g. artifacts, stay)."""
    lines = "\n".join(f"  - {d}" for d in code_deps(stage_closure(module)))
    return f"\nits code deps (what `{module}` imports) are:\n{lines}"


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


@functools.lru_cache(maxsize=None)
def stage_closure(module: str) -> frozenset[Path]:
    return frozenset(closure(module))


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
    missing = sorted(f.relative_to(REPO).as_posix() for f in stage_closure(module) if not covered(f, st["deps"]))
    assert not missing, (f"dvc.yaml stage {stage} runs `{module}`, which imports files its deps lack: "
                         f"{missing}; replace the stage's code deps with the list below{_paste(stage, module)}")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_exist_and_are_used(stage):
    st = STAGES[stage]
    code = [d for d in st["deps"] if d.split("/")[0] in PROJECT]
    gone = [d for d in code if not (REPO / d).exists()]
    assert not gone, f"dvc.yaml stage {stage} depends on code that does not exist: {gone}; update its deps"
    module = command_module(st["cmd"])
    used = stage_closure(module)
    # a dep on a file the stage never imports, or on a directory holding one, reruns it for nothing
    unused = [d for d in code if not (_files_under(REPO / d) if (REPO / d).is_dir() else {REPO / d}) <= used]
    assert not unused, (f"dvc.yaml stage {stage} depends on code its command never imports: {unused}; replace "
                        f"the stage's code deps with the list below{_paste(stage, module)}")


def test_code_deps_are_the_shortest_exact_list(tmp_path):
    for rel in ("crossdiff_core/__init__.py", "crossdiff_core/a.py", "crossdiff_core/sub/__init__.py",
                "crossdiff_core/sub/b.py", "crossdiff_core/sub/t/page.j2", "crossdiff_core/half/__init__.py",
                "crossdiff_core/half/c.py", "crossdiff_core/half/d.py", "crossdiff_core/half/__pycache__/d.pyc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    used = {tmp_path / r for r in ("crossdiff_core/__init__.py", "crossdiff_core/sub/__init__.py",
                                   "crossdiff_core/sub/b.py", "crossdiff_core/sub/t/page.j2",
                                   "crossdiff_core/half/__init__.py", "crossdiff_core/half/c.py")}
    # the top-level package is never one dep (a new module in it would rerun every stage)
    assert code_deps(used, tmp_path) == ["crossdiff_core/sub", "crossdiff_core/__init__.py",
                                         "crossdiff_core/half/__init__.py", "crossdiff_core/half/c.py"]


# what only the whole pipeline (flows.pipeline) and the tests import: every stage's code
PIPELINE_ONLY = ("flows/sections.py", "flows/pipeline.py")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_the_whole_pipeline(stage):
    files = {f.relative_to(REPO).as_posix() for f in stage_closure(command_module(STAGES[stage]["cmd"]))}
    assert not files & set(PIPELINE_ONLY), (f"dvc.yaml stage {stage} imports {sorted(files & set(PIPELINE_ONLY))}, "
                                            "which import every stage's code: read the stage's own sections with "
                                            "flows.common.section and its own config classes instead")


def test_the_models_stage_depends_on_no_later_stage():
    # a change to training, analysis, steering or the report must not rebuild the toy pair
    files = {f.relative_to(REPO).as_posix() for f in stage_closure(command_module(STAGES["toy_models"]["cmd"]))}
    later = {"crossdiff_core/trainer.py", "crossdiff_core/analysis.py", "crossdiff_core/steering.py",
             "crossdiff_core/kl_eval.py", "crossdiff_core/locate.py", "crossdiff_core/caching.py",
             "crossdiff_core/cards.py", "tasks/training.py", "tasks/analysis.py", "tasks/steering.py",
             "tasks/reporting.py"}
    assert not files & later and not any(f.startswith("crossdiff_core/report/") for f in files), sorted(files & later)


def test_bytecode_does_not_change_code_deps():
    # a directory dep's hash would otherwise change whenever Python writes __pycache__ into it
    ignored = {line.strip() for line in (REPO / ".dvcignore").read_text().splitlines()}
    assert {"__pycache__/", "*.pyc"} <= ignored
