"""dvc.yaml's deps name what each stage runs: its script and every edadm module it imports.

The imports are read from the source (``ast``), transitively, including imports inside
functions, so a stage that starts to use another module fails here until dvc.yaml lists it.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
``python tests/test_stage_deps.py`` prints each stage's deps as they should read.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edadm"


def _module_file(module: str) -> Path | None:
    """The source file of an ``edadm`` module name, or None if it is not one (e.g. a class)."""
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


@functools.cache  # every stage walks the same modules: parse each once
def _imported_modules(path: Path) -> frozenset[str]:
    """Absolute names of the edadm modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[str] = set()
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            # `from edadm.quant import export` imports the submodule edadm.deploy.export
            found |= {f"{module}.{alias.name}" for alias in node.names}
    modules = set()
    for name in found:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            parts = name.split(".")
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return frozenset(m for m in modules if _module_file(m) is not None)


def library_files(script: Path) -> set[Path]:
    """Every edadm source file that running ``script`` imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for module in _imported_modules(path):
            file = _module_file(module)
            if file not in seen:
                seen.add(file)
                todo.append(file)
    return seen


def stage_scripts() -> dict[str, Path]:
    """Stage name -> the stage script its command runs (``python stages/X.py ...``)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    scripts = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        script = next((w for w in words if w.startswith("stages/") and w.endswith(".py")), None)
        assert script, f"stage {name} runs no stages/*.py script: {stage['cmd']}"
        scripts[name] = ROOT / script
    return scripts


def minimal_deps(files: set[Path]) -> list[str]:
    """The files as dvc.yaml deps: a subpackage folder where every module of it is needed."""
    deps = set()
    for file in files:
        folder = file.parent
        if folder != ROOT / PACKAGE and set(folder.glob("*.py")) <= files:
            deps.add(folder.relative_to(ROOT).as_posix())
        else:
            deps.add(file.relative_to(ROOT).as_posix())
    return sorted(deps)


def _covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def _excess(dep: str, imported: set[Path]) -> bool:
    """Whether ``dep`` names edadm source that ``imported`` does not hold: a module it lacks, or a
    folder with a module it lacks. Data (the prompts, the shipped weights: no .py) is no import."""
    path = ROOT / dep.rstrip("/")
    if not dep.startswith(PACKAGE + "/"):
        return False  # the script, artifacts
    if path.suffix == ".py" or not path.exists():
        return path not in imported  # a module, or one that no longer exists
    if path.is_dir():
        return not set(path.rglob("*.py")) <= imported
    return False


@pytest.mark.parametrize("stage", sorted(stage_scripts()))
def test_stage_deps_name_every_module_the_stage_imports(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    script = stage_scripts()[stage]
    assert script.relative_to(ROOT).as_posix() in deps
    assert PACKAGE not in [d.rstrip("/") for d in deps], "list the modules, not the whole package"
    imported = library_files(script)
    should = minimal_deps(imported)
    missing = sorted(f.relative_to(ROOT).as_posix() for f in imported if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage} misses deps {missing}; it should list {should}"
    # and no more: an edit to a module the script never imports must rerun nothing
    excess = sorted(d for d in deps if _excess(d, imported))
    assert not excess, f"dvc.yaml stage {stage} lists deps it does not import: {excess}; list {should}"


def test_excess_deps_are_caught_and_data_deps_allowed():
    """The check above flags a module or folder the script does not import, not data."""
    imported = library_files(stage_scripts()["select"])
    assert _excess("edadm/inspect.py", imported) and _excess("edadm/metrics", imported)
    assert _excess("edadm/deploy/integer.py", imported) and _excess("edadm/gone.py", imported)
    assert not _excess("edadm/calib", imported) and not _excess("edadm/calib/knn.py", imported)
    assert not _excess("edadm/diffusion/prompts.txt", imported)
    assert not _excess("edadm/diffusion/weights", imported) and not _excess("artifacts/model", imported)
    # a folder of which the script imports some modules only is an excess dep too
    recon = library_files(stage_scripts()["reconstruct"])
    assert _excess("edadm/calib", recon) and not _excess("edadm/calib/store.py", recon)


def test_model_stage_depends_on_the_shipped_weights():
    """New shipped weights must rerun the model stage (they are data, not an import)."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["model"]["deps"]
    assert "edadm/diffusion/weights" in deps and (ROOT / "edadm/diffusion/weights").is_dir()


def test_inspect_and_cli_are_no_stage_dep():
    """Editing `edadm inspect` or the CLI must rerun no stage."""
    for stage, script in stage_scripts().items():
        files = {f.relative_to(ROOT).as_posix() for f in library_files(script)}
        assert not files & {"edadm/inspect.py", "edadm/cli.py"}, stage


def test_the_import_reader_follows_function_level_and_relative_imports(tmp_path):
    script = ROOT / "stages" / "sample_quant.py"  # imports edadm.quant.state inside main()
    files = {f.relative_to(ROOT).as_posix() for f in library_files(script)}
    assert {
        "edadm/__init__.py",
        "edadm/quant/__init__.py",
        "edadm/quant/state.py",
        "edadm/diffusion/samples.py",
    } <= files


if __name__ == "__main__":
    for name, script in stage_scripts().items():
        print(
            f"{name}:",
            *[script.relative_to(ROOT).as_posix(), *minimal_deps(library_files(script))],
            sep="\n  - ",
        )
