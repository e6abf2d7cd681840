"""Every way to install, test, lint, type-check, build, document, benchmark and demo the vl suite.

``python -m nox`` runs the default sessions (lint, typecheck, tests, isolated);
``python -m nox -s demo`` runs the main job; ``python -m nox -l`` lists everything.

Packages are discovered from ``packages/*/pyproject.toml``; sibling dependencies
(``vl-vision -> vl-rope``) are installed before their dependents. Every install
goes through ``constraints.txt`` (torch is pinned to the local CPU build there;
an unconstrained torch pulls gigabytes of CUDA wheels). Sessions use nox's
default pip-based virtualenv backend: uv cannot see the local torch wheel.
"""

from __future__ import annotations

import ast
import shutil
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ROOT / "constraints.txt"
DIST = ROOT / "dist"
PYTEST_ARGS = ("-q", "-ra", "--durations=15")

nox.options.sessions = ["lint", "typecheck", "tests", "isolated"]
nox.options.error_on_missing_interpreters = False


# --------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class Package:
    """One ``packages/<name>`` project, as declared in its pyproject.toml."""

    name: str  # distribution name, e.g. "vl-rope"
    path: Path  # packages/vl-rope
    dependencies: tuple[Requirement, ...]
    extras: dict[str, tuple[Requirement, ...]]
    version_file: Path | None  # [tool.hatch.version] path, holds __version__

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")

    @property
    def src(self) -> Path:
        return self.path / "src"

    def requirements(self, *extras: str) -> tuple[Requirement, ...]:
        reqs = list(self.dependencies)
        for extra in extras:
            reqs.extend(self.extras.get(extra, ()))
        return tuple(reqs)

    def siblings(self, *extras: str) -> list[str]:
        """Names of suite packages this one requires (directly) with the given extras."""
        return [n for r in self.requirements(*extras) if (n := canonicalize_name(r.name)) in PACKAGES]

    def version(self) -> str:
        """``__version__`` from the version file, read statically (no import)."""
        if self.version_file is None:
            raise RuntimeError(f"{self.name}: no [tool.hatch.version] path")
        tree = ast.parse(self.version_file.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
            ):
                return str(ast.literal_eval(node.value))
        raise RuntimeError(f"{self.name}: no __version__ in {self.version_file}")


def _load(pyproject: Path) -> Package:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    version_path = data.get("tool", {}).get("hatch", {}).get("version", {}).get("path")
    return Package(
        name=canonicalize_name(project["name"]),
        path=pyproject.parent,
        dependencies=tuple(Requirement(r) for r in project.get("dependencies", [])),
        extras={
            canonicalize_name(extra): tuple(Requirement(r) for r in reqs)
            for extra, reqs in project.get("optional-dependencies", {}).items()
        },
        version_file=pyproject.parent / version_path if version_path else None,
    )


def _discover() -> dict[str, Package]:
    found = {p.name: p for p in map(_load, sorted(ROOT.glob("packages/*/pyproject.toml")))}
    # Dependency order: every package after the siblings it requires (any extra counts).
    ordered: dict[str, Package] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise RuntimeError(f"dependency cycle through {name}")
        visiting.add(name)
        pkg = found[name]
        reqs = pkg.requirements(*pkg.extras)
        for dep in sorted({canonicalize_name(r.name) for r in reqs} & found.keys()):
            visit(dep)
        visiting.discard(name)
        ordered[name] = pkg

    for name in found:
        visit(name)
    return ordered


PACKAGES = _discover()
PACKAGE_NAMES = list(PACKAGES)


def _closure(pkg: Package, *extras: str) -> list[Package]:
    """``pkg`` and every suite package it needs with ``extras`` (siblings' own base deps), in install order."""
    needed: set[str] = set()
    todo = [(pkg.name, extras)]
    while todo:
        name, wanted = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend((dep, ()) for dep in PACKAGES[name].siblings(*wanted))
    return [p for p in PACKAGES.values() if p.name in needed]


def _install(session: nox.Session, *args: str) -> None:
    """``pip install`` under the constraints, including the isolated build environments (hatchling)."""
    session.install(*args, "-c", str(CONSTRAINTS), *_build_constraint(session))


def _build_constraint(session: nox.Session) -> list[str]:
    # pip >= 25.3 constrains build dependencies with --build-constraint; older pips ignore -c there.
    out = session.run("python", "-m", "pip", "--version", silent=True)
    version = Version(str(out).split()[1]) if out else Version("0")
    return ["--build-constraint", str(CONSTRAINTS)] if version >= Version("25.3") else []


def _editable(*extras_wanted: str) -> list[str]:
    """``-e packages/<name>[extras]`` for every package, declared extras only, in dependency order."""
    args: list[str] = []
    for pkg in PACKAGES.values():
        extras = [e for e in extras_wanted if e in pkg.extras]
        args += ["-e", f"{pkg.path}[{','.join(extras)}]" if extras else str(pkg.path)]
    return args


# --------------------------------------------------------------------------- sessions


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite in one venv: every package editable with its test (and triton) extras."""
    _install(session, *_editable("test", "triton"), "transformers", "pytest")
    session.run("pytest", *PYTEST_ARGS, *session.posargs)


@nox.session
@nox.parametrize("package", PACKAGE_NAMES, ids=PACKAGE_NAMES)
def isolated(session: nox.Session, package: str) -> None:
    """One package installed from its wheel with only its declared dependencies, then its own tests.

    Installs exactly as the docs tell users to (``pip install --find-links dist vl-model``: by name from a
    folder of the suite's wheels, the siblings found there too), and checks that the local version is what
    got installed. Proves the package stands alone: no transformers (unless declared), no source tree on
    ``sys.path`` (``--import-mode=importlib``, src layout, no ``tests/__init__.py``).
    """
    pkg = PACKAGES[package]
    needed = _closure(pkg, "test")
    wheels = Path(session.create_tmp()) / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    build_constraint = _build_constraint(session)
    for dep in needed:
        session.run(
            "python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels),
            *build_constraint, str(dep.path),
        )  # fmt: skip

    # The documented command; pinning the local version means a same-named project on an index can never win.
    session.install("--find-links", str(wheels), f"{pkg.name}[test]=={pkg.version()}", "-c", str(CONSTRAINTS))

    declared = {canonicalize_name(r.name) for p in needed for r in p.requirements(*(("test",) if p is pkg else ()))}
    absent = [m for m in ("transformers",) if m not in declared]
    check = (
        "import importlib.util, sys\n"
        f"import {pkg.module}\n"
        f"assert 'site-packages' in {pkg.module}.__file__, {pkg.module}.__file__\n"
        f"assert {pkg.module}.__version__ == {pkg.version()!r}, {pkg.module}.__version__\n"
        "assert not [p for p in sys.path if 'packages' in p and p.endswith('src')], sys.path\n"
        f"for name in {absent!r}:\n"
        "    assert importlib.util.find_spec(name) is None, f'{name} is installed but not declared'\n"
        f"print({pkg.module}.__name__, {pkg.module}.__version__, 'from', {pkg.module}.__file__, '; absent:', {absent!r})\n"
    )
    session.run("python", "-c", check)
    tests_dir = ROOT / "tests" / pkg.module
    if not tests_dir.is_dir():
        session.skip(f"no tests/{pkg.module}")
    session.run(
        "pytest", "--import-mode=importlib", *PYTEST_ARGS, str(tests_dir.relative_to(ROOT)), *session.posargs,
        env={"PYTHONPATH": None},
    )  # fmt: skip
    # Six venvs with torch at ~2 GB each would otherwise stay on disk until the run ends; CI's disk is not ours.
    # A failed session keeps its venv for inspection.
    shutil.rmtree(session.virtualenv.location, ignore_errors=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole repo."""
    _install(session, "ruff")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's src (config in the root pyproject.toml)."""
    _install(session, *_editable(), "mypy")
    session.run("mypy", *(str(p.src.relative_to(ROOT)) for p in PACKAGES.values()), *session.posargs)


@nox.session
def build(session: nox.Session) -> None:
    """Wheel + sdist of every package into dist/, twine check, py.typed and version checks."""
    _install(session, "build", "twine", "hatchling")
    shutil.rmtree(DIST, ignore_errors=True)
    for pkg in PACKAGES.values():
        # --no-isolation: build with the pinned hatchling installed above.
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(DIST), str(pkg.path))
    session.run("twine", "check", "--strict", *(str(p) for p in sorted(DIST.iterdir())))
    for pkg in PACKAGES.values():
        (wheel,) = DIST.glob(f"{pkg.module}-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if f"{pkg.module}/py.typed" not in names:
                session.error(f"{wheel.name}: no {pkg.module}/py.typed")
            (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
            meta_version = Parser().parsestr(zf.read(metadata).decode())["Version"]
        if meta_version != pkg.version():
            session.error(f"{wheel.name}: METADATA Version {meta_version} != __version__ {pkg.version()}")
        session.log(f"{wheel.name}: py.typed present, version {meta_version} == __version__")


@nox.session
def docs(session: nox.Session) -> None:
    """Generate the figures (docs/scripts/*.py) and build the mkdocs site strictly."""
    _install(session, *_editable(), "mkdocs", "mkdocs-material", "mkdocstrings[python]", "matplotlib")
    for script in sorted((ROOT / "docs" / "scripts").glob("*.py")):
        session.run("python", str(script.relative_to(ROOT)), env={"MPLBACKEND": "Agg"})
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks -> benchmarks/RESULTS.md (e.g. ``nox -s bench -- --quick``)."""
    _install(session, *_editable("triton"), "transformers")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """The prepared GPU run (issue 22): needs CUDA; under 9 minutes on one H100/H200.

    Runs ``benchmarks/gpu/run_gpu.py``: versions and ``nvidia-smi``, the ``gpu``-marked tests of
    vl-moe, vl-rope, vl-vision and vl-model, the MoE four-gradient check at 4K tokens, the MoE
    timing grid (``do_bench`` with CUDA-graph replay, weights rotated over 4 layers) against
    transformers' eager and grouped_mm experts and the roofline, a per-kernel profile at 16K
    tokens, the vision tower and a 2B-sized VLM against transformers; writes ``RESULTS-gpu.md``
    (a fragment for benchmarks/RESULTS.md), ``gpu-results.json`` and ``pytest-gpu.log`` to
    ``$OUT`` (else ``benchmarks/gpu/out``). Where the interpreter already has CUDA torch, Triton and
    transformers (a lent GPU machine without nox), run ``python3 benchmarks/gpu/run_gpu.py`` directly.
    """
    _install(session, *_editable("test", "triton"), "transformers", "pytest")
    session.run("python", "benchmarks/gpu/run_gpu.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job (issue 8): a tiny Qwen3-VL-class model through V0 -> S0 -> S1 -> SFT -> RL, evaluated after each stage.

    Runs ``examples/demo/run.py``: held-out accuracy per task, ``runs/demo/report.md`` with the accuracy
    table, wall times, loss and reward PNGs, and the model saved and reloaded in Hugging Face format.
    Extra arguments go to the script (e.g. ``nox -s demo -- --moe`` or ``nox -s demo -- --smoke``).
    """
    _install(session, *_editable("metrics"))
    session.run("python", "examples/demo/run.py", *session.posargs)
