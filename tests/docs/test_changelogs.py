"""Every package's CHANGELOG opens with the version its ``__version__`` says (a bump comes with its notes)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGES = sorted((Path(__file__).resolve().parents[2] / "packages").glob("vl-*"))


def _version(package: Path) -> str:
    init = package / "src" / package.name.replace("-", "_") / "__init__.py"
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise AssertionError(f"no __version__ in {init}")


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_changelog_opens_with_the_package_version(package: Path) -> None:
    headings = re.findall(r"^## (\S+)", (package / "CHANGELOG.md").read_text(encoding="utf-8"), flags=re.M)
    assert headings and headings[0] == _version(package), (package.name, headings[:2], _version(package))
    assert len(headings) == len(set(headings)), f"{package.name}: a version listed twice: {headings}"
