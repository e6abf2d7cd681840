"""Smoke test of the whole demo (``examples/demo/run.py --smoke``): every stage, the report, plots, HF reload."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import run as demo_run
from demo_rl import rl_available

from vl_train.data.synthetic import TASK_NAMES


def test_smoke_run_writes_report_plots_model_and_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    start = time.perf_counter()
    assert demo_run.main(["--smoke", "--output", str(out), "--no-progress"]) == 0
    assert time.perf_counter() - start < 90

    report = (out / "report.md").read_text()
    stages = ["before training", "after S0", "after S1", "after SFT"] + (["after RL"] if rl_available() else [])
    for label in stages:
        assert f"| {label} |" in report
    assert "| majority answer |" in report
    assert "| chance |" in report and "| stage | " + " | ".join(TASK_NAMES) + " | mean |" in report
    assert "[Training loss per stage](loss_per_stage.png)" in report
    assert "| V0 |" in report and (out / "V0" / "metrics.jsonl").is_file()  # the tower pretrained alone, timed
    pngs = ["loss_per_stage.png"] + (["rl_reward.png"] if rl_available() else [])
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    if not rl_available():
        assert "RL was skipped" in report
    else:  # one RL run per seed from the same start, the gain reported against the seed spread
        assert "over 2 seeds" in report and "standard error of one such estimate" in report
        assert (out / "RL" / "seed0").is_dir() and (out / "RL" / "seed1").is_dir()

    rows = json.loads((out / "accuracy.json").read_text())
    assert [r[0] for r in rows] == stages
    assert all(set(r[1]) == set(TASK_NAMES) and all(0.0 <= v <= 1.0 for v in r[1].values()) for r in rows)

    # the saved folder is a Hugging Face model + processor, and four example answers were written
    assert (out / "model" / "config.json").is_file() and list((out / "model").glob("*.safetensors"))
    assert report.count("**Q (image):**") == 3 and report.count("**Q (video):**") == 1
    assert len(list((out / "examples").glob("example_*.png"))) == 4
    printed = capsys.readouterr().out
    assert printed.count("Q (") == 4 and f"demo: report {(out / 'report.md').resolve()}" in printed


def test_bad_arguments_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo_run.parse_args(["--eval-size", "0"])
    assert "--eval-size must be >= 1" in capsys.readouterr().err
