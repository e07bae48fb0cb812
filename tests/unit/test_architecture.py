"""docs/architecture.md opens with the package's folder tree: it names every module and folder,
and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sandbox_env"
SKIPPED = {"__init__.py", "_version.py", "openenv.yaml"}


def documented_paths() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = re.search(r"```text\n(sandbox_env/\n.*?)```", text, re.S)
    assert tree, "docs/architecture.md should open with the tree in a ```text block"
    paths, stack = set(), []
    for line in tree.group(1).splitlines()[1:]:
        entry = re.match(r"^((?:│   |    )*)(?:├── |└── )(\S+)", line)
        assert entry, f"not a tree line: {line!r}"
        depth = len(entry.group(1)) // 4
        stack[depth:] = [entry.group(2).rstrip("/")]
        paths.add("/".join(stack))
    return paths


def package_paths() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*"):
        relative = path.relative_to(PACKAGE)
        if "__pycache__" in relative.parts or path.name in SKIPPED or relative.parent.name in ("templates", "static"):
            continue  # the page's folders are named, not their files
        if path.is_dir() or path.suffix == ".py":
            found.add(relative.as_posix())
    return found


def test_the_tree_names_exactly_the_packages_modules() -> None:
    documented, actual = documented_paths(), package_paths()
    missing, stale = sorted(actual - documented), sorted(documented - actual)
    assert (missing, stale) == ([], []), f"docs/architecture.md lacks {missing}, names {stale} that is not there"
