"""The site's structure: mkdocs.yml's nav and the pages on disk agree, and every package has its pages.

``mkdocs build --strict`` (``nox -s docs``) checks this too, but only when the docs are built; these
checks run with the test suite, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # (no stubs installed) a dependency of transformers and mkdocs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


class _Loader(yaml.SafeLoader):
    """Safe loading that keeps mkdocs' ``!!python/name:`` tags as plain strings instead of importing them."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def nav_pages(nav: Any) -> list[str]:
    """Every page path in a mkdocs ``nav`` tree, in order."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {nav!r}")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)


def test_nav_lists_every_page_once(config: dict[str, Any]) -> None:
    pages = nav_pages(config["nav"])
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "scripts" not in p.parts}
    assert len(pages) == len(set(pages)), f"pages listed twice: {sorted({p for p in pages if pages.count(p) > 1})}"
    assert not on_disk - set(pages), f"pages missing from the nav of mkdocs.yml: {sorted(on_disk - set(pages))}"
    assert not set(pages) - on_disk, f"nav entries without a page under docs/: {sorted(set(pages) - on_disk)}"


def test_every_package_has_a_page_an_api_page_and_source_path(config: dict[str, Any]) -> None:
    pages = set(nav_pages(config["nav"]))
    handler = config["plugins"][1]["mkdocstrings"]["handlers"]["python"]
    for package in PACKAGES:
        module = package.replace("-", "_")
        assert any(p.startswith(f"packages/{package}") for p in pages), f"no package page for {package}"
        assert f"api/{module}.md" in pages, f"no API page for {module}"
        assert f"packages/{package}/src" in handler["paths"], f"mkdocstrings cannot see packages/{package}/src"
        assert f"::: {module}" in (DOCS / "api" / f"{module}.md").read_text(encoding="utf-8")


def test_nav_walker() -> None:
    nav = [{"Home": "index.md"}, {"Group": [{"A": "a.md"}, {"Sub": [{"B": "b/b.md"}]}]}, "c.md"]
    assert nav_pages(nav) == ["index.md", "a.md", "b/b.md", "c.md"]
    with pytest.raises(TypeError, match="unexpected nav entry"):
        nav_pages([{"Bad": 3}])
