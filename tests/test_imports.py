"""Imports point one way, along the data flow (ARCHITECTURE §1): a module imports only from its own stage or an
earlier one, so each stage can be read, tested and replaced without the ones after it.

The stages, in order: the shared core (top-level modules such as sd3/config.py, sd3/batch.py) -> data -> encoders
-> distributed -> model -> train -> sample -> plan / eval -> bench / commands -> cli. Lazy imports inside functions
count too: they are still dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sd3

PACKAGE = Path(sd3.__file__).parent
STAGES = [
    {"core"}, {"data"}, {"encoders"}, {"distributed"}, {"model"}, {"train"}, {"sample"}, {"plan", "eval"},
    {"bench", "commands"}, {"cli", "__main__"},
]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}


def stage_of(module: str) -> str:
    """'sd3.data.sampler' -> 'data'; a top-level module (sd3.config) is the core, except the cli and __main__."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "configs":  # sd3.configs holds the preset files only
        return "core"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return parts[1] if parts[1] in ("cli", "__main__") else "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every sd3 import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sd3"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "sd3":
                # `from sd3 import cli` imports the submodule sd3.cli
                names = [f"{target}.{a.name}" for a in node.names] if target == "sd3" else [target]
                found += [(node.lineno, n) for n in names]
    return found


def test_every_stage_is_known():
    stages = {stage_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert stages <= set(RANK), f"add these packages to STAGES: {sorted(stages - set(RANK))}"


def test_imports_point_one_way():
    backwards = []
    files = sorted(PACKAGE.rglob("*.py"))
    for path in files:
        mine = stage_of(module_name(path))
        for line, target in imported(path):
            theirs = stage_of(target)
            if RANK[theirs] > RANK[mine]:
                backwards.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({mine}) imports {target} ({theirs})")
    assert len(files) > 50  # the walk found the package
    assert not backwards, "imports against the data flow:\n" + "\n".join(backwards)
