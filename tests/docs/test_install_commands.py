"""Every install command the docs give for a suite package is the one CI runs (``isolated`` nox sessions).

The packages are not on an index: ``pip install vl-model`` or ``pip install ./packages/vl-model`` fail on a
clean machine (the siblings cannot be found). The working form is ``pip install --find-links dist <name>``
after ``python -m nox -s build``; this test keeps every README and docs page to it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("packages/*/README.md"))]
PACKAGES = {p.parent.name for p in ROOT.glob("packages/*/pyproject.toml")}
INSTALL = re.compile(r"pip install ([^`\n#]*)")


def test_every_suite_install_command_uses_the_wheelhouse() -> None:
    wrong = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            for match in INSTALL.finditer(line):
                words = match.group(1).replace('"', "").split()
                named = [w for w in words if re.sub(r"\[.*\]$", "", w.removeprefix("./packages/")) in PACKAGES]
                if named and (words[:2] != ["--find-links", "dist"] or any(w.startswith("./") for w in named)):
                    wrong.append(f"{page.relative_to(ROOT)}:{number}: {match.group(0).strip()}")
    assert not wrong, "install commands CI does not run:\n" + "\n".join(wrong)


def test_the_build_command_is_given_where_packages_are_installed() -> None:
    for page in (ROOT / "docs" / "getting-started.md", *ROOT.glob("packages/*/README.md")):
        text = page.read_text(encoding="utf-8")
        if "pip install --find-links dist" in text:
            assert "nox -s build" in text, (
                f"{page.relative_to(ROOT)} installs from dist/ without saying how to build it"
            )


def test_the_noxfile_installs_like_the_docs() -> None:
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert 'session.install("--find-links", str(wheels), f"{pkg.name}[test]=={pkg.version()}"' in noxfile
