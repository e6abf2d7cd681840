"""Run every ``benchmarks/bench_*.py`` in one process and write ``benchmarks/RESULTS.md``.

Each script defines ``run(quick: bool) -> list[Row]`` (see ``_harness.py``). Rows compare ours
against a named baseline timed in the same run; the table reports both times and the ratio.

Usage (normally through ``python -m nox -s bench -- [args]``)::

    python benchmarks/run_all.py [--quick] [--only NAME] [--output PATH]

A section titled ``## GPU results`` already present in the output file is kept verbatim: GPU
numbers are recorded by hand from another machine. A script that raises is reported as a failed
row, and the runner exits non-zero after writing everything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import os
import platform
import shlex
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:  # `python benchmarks/run_all.py` puts only benchmarks/ on sys.path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._harness import Row  # noqa: E402

GPU_HEADING = "## GPU results"
SUITE_MODULES = ("vl_rope", "vl_vision", "vl_moe", "vl_model", "vl_train", "vl_rl")


@dataclass
class Outcome:
    """What one benchmark script produced: rows, or the error that stopped it."""

    name: str
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


def _load(path: Path) -> ModuleType:
    # Named inside the `benchmarks` package so scripts may use `from benchmarks._harness import ...`
    # or `from ._harness import ...`; plain `from _harness import ...` works through benchmarks/ on sys.path.
    name = f"benchmarks.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(path: Path, quick: bool) -> Outcome:
    outcome = Outcome(path.stem)
    try:
        rows = _load(path).run(quick)
        outcome.rows = list(rows)
        bad = [r for r in outcome.rows if not isinstance(r, Row)]
        if bad:
            raise TypeError(f"run() returned non-Row items: {bad[:3]!r}")
    except Exception as exc:  # a failing script must not stop the others
        traceback.print_exc()
        outcome.error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return outcome


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment() -> dict[str, str]:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    env = {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "CUDA device": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if platform.processor():
        env["processor"] = platform.processor()
    for name in ("transformers", "triton", *SUITE_MODULES):
        version = _version(name)
        if version is not None:
            env[name] = version
    return env


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown_table(outcome: Outcome) -> str:
    if not outcome.rows and outcome.error is None:
        return "_No rows: the script measured nothing on this machine (see its output, e.g. needs CUDA)._"
    lines = ["| case | baseline | baseline ms | ours ms | speedup (x) |", "|---|---|---:|---:|---:|"]
    for r in outcome.rows:
        case = f"{r.case} ({r.note})" if r.note else r.case
        if r.device != "cpu":
            case = f"{case} [{r.device}]"
        lines.append(f"| {case} | {r.baseline} | {_ms(r.baseline_ms)} | {_ms(r.ours_ms)} | {r.speedup:.2f} |")
    if outcome.error is not None:
        lines.append(f"| **FAILED** | {outcome.error.replace('|', '/')} | - | - | - |")
    return "\n".join(lines)


def text_table(outcomes: Sequence[Outcome]) -> str:
    header = ("benchmark", "case", "baseline", "baseline ms", "ours ms", "speedup")
    body = [
        (o.name, r.case, r.baseline, _ms(r.baseline_ms), _ms(r.ours_ms), f"{r.speedup:.2f}x")
        for o in outcomes
        for r in o.rows
    ]
    body += [(o.name, "FAILED", o.error or "", "-", "-", "-") for o in outcomes if o.error is not None]
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in (header, *body))


def gpu_section(existing: str) -> str | None:
    """The ``## GPU results`` section of an existing RESULTS.md (up to the next ``## `` heading), verbatim."""
    lines = existing.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == GPU_HEADING), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end]).rstrip() + "\n"


def render(outcomes: Sequence[Outcome], env: dict[str, str], command: str, keep: str | None) -> str:
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run_all.py`. Each row times ours and a named baseline alternately in one "
        "process; **speedup = baseline ms / ours ms** (median of repeats). Compare ratios, not absolute times.",
        "",
        f"Command: `{command}`",
        "",
        *(f"- **{key}**: {value}" for key, value in env.items()),
        "",
    ]
    for outcome in outcomes:
        parts += [f"## {outcome.name}", "", markdown_table(outcome), ""]
    if keep is not None:
        parts += [keep]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke run)")
    parser.add_argument("--only", metavar="NAME", help="run only scripts whose file name contains NAME")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "RESULTS.md", help="markdown file to write")
    args = parser.parse_args(argv)

    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.name]
    if not scripts:
        print(f"no benchmark scripts matched in {BENCH_DIR}", file=sys.stderr)
        return 1

    outcomes = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        outcomes.append(run_script(script, args.quick))

    command = shlex.join(["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    existing = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(outcomes, environment(), command, gpu_section(existing)), encoding="utf-8")

    print()
    print(text_table(outcomes))
    print(f"\nwrote {args.output}")
    failed = [o.name for o in outcomes if o.error is not None]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
