"""Dependencies point one way: harness -> systems -> core, workloads -> core.

`systems/` never imports `harness/`; `workloads/` (data) imports neither; `core/`
imports nothing of ours. Checked on the source (every import statement,
including ones inside functions), so a lazy import cannot hide a violation.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "core": {"harness", "systems", "workloads"},
    "systems": {"harness", "workloads"},
    "workloads": {"harness", "systems"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_packages(path) & FORBIDDEN[package]):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_checker_sees_lazy_imports(tmp_path):
    """The checker must catch an import inside a function (a lazy import is still a dependency)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from harness import schema\n    import systems.base\n")
    assert imported_packages(module) == {"harness", "systems"}


OUTSIDE_DOCS, OUTSIDE_PARENT = "shared" + "/docs", "../" + "shared"  # split: this file must not match itself


def test_repository_cites_nothing_outside_itself():
    """README, docs and code name no file outside the repository (the team's notes are not part of it)."""
    hits = []
    for pattern in ("**/*.py", "**/*.md", "**/*.toml", "**/*.sh"):
        for path in ROOT.glob(pattern):
            if ".venv" in path.parts or ".git" in path.parts or "results" in path.parts:
                continue
            text = path.read_text(errors="replace")
            if OUTSIDE_DOCS in text or OUTSIDE_PARENT in text:
                hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"files citing outside the repository: {sorted(set(hits))}"
