"""The documentation site's code runs: every ```python block of the tutorials, getting started and home page.

Each page's blocks run in order in one namespace (a page is one script split by prose), in a fresh
temporary working directory so nothing a page writes lands in the checkout. A page that imports a
third-party module which is not installed (transformers, matplotlib, ...) is skipped, naming it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
OPTIONAL_PAGES = [DOCS / "getting-started.md", DOCS / "index.md"]  # checked when they hold python blocks
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks in order (```text / ```bash blocks are not run)."""
    return FENCE.findall(page.read_text(encoding="utf-8"))


def imported_modules(blocks: list[str]) -> set[str]:
    """Top-level names of the modules the blocks import."""
    names: set[str] = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def missing_optional(blocks: list[str]) -> list[str]:
    """Third-party modules the blocks import that are not installed (our own ``vl_*`` packages must be)."""
    third_party = {m for m in imported_modules(blocks) if not m.startswith("vl_") and m not in sys.stdlib_module_names}
    return sorted(m for m in third_party if importlib.util.find_spec(m) is None)


def run_page(page: Path, blocks: list[str]) -> dict[str, object]:
    """Execute the blocks in one namespace; an error names the block (1-based) that raised it."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"{page.relative_to(ROOT)} (python block {number})", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.relative_to(ROOT)}: python block {number} raised {exc!r}") from exc
    return namespace


def test_tutorials_exist() -> None:
    names = {p.name for p in TUTORIALS}
    expected = {
        "compose-your-own-vlm.md",
        "fine-tune-qwen3-vl.md",
        "official-checkpoints.md",
        "training-stages.md",
        "rl-with-sapo.md",
        "rl-on-your-own-data.md",
        "moe-kernel-in-your-model.md",
    }
    assert expected <= names, f"missing tutorials: {sorted(expected - names)}"


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python examples"
    missing = missing_optional(blocks)
    if missing:
        pytest.skip(f"{page.name} needs {missing}, not installed")
    monkeypatch.chdir(tmp_path)
    run_page(page, blocks)


@pytest.mark.parametrize("page", OPTIONAL_PAGES, ids=lambda p: p.stem)
def test_page_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} holds no python blocks")
    missing = missing_optional(blocks)
    if missing:
        pytest.skip(f"{page.name} needs {missing}, not installed")
    monkeypatch.chdir(tmp_path)
    run_page(page, blocks)


def test_harness_reports_the_failing_block(tmp_path: Path) -> None:
    page = DOCS / "fake.md"  # only its name is used
    blocks = ["x = 1\n", "assert x == 2, 'wrong x'\n"]
    with pytest.raises(AssertionError, match=r"python block 2 raised"):
        run_page(page, blocks)


def test_harness_finds_blocks_and_optional_imports(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nimport torch\nfrom not_a_real_module_xyz import thing\n```\n"
        "```text\nnot run\n```\n```python\nimport vl_rope, json\n```\n"
    )
    blocks = python_blocks(page)
    assert len(blocks) == 2 and "not run" not in "".join(blocks)
    assert imported_modules(blocks) == {"torch", "not_a_real_module_xyz", "vl_rope", "json"}
    assert missing_optional(blocks) == ["not_a_real_module_xyz"]
