"""``torchrun -m vl_train RECIPE`` on 2 gloo ranks ends in the same model as one process given the same batches;
``torchrun -m vl_rl RECIPE`` trains with a KL reference and hands back a model transformers loads.

Data parallelism (2 ranks x 1 micro-batch == 1 process x 2 accumulated), context parallelism (2 ranks splitting
each row == 1 process) on an official-layout checkpoint, and expert parallelism (2 ranks holding half the
experts each) on an official MoE checkpoint: the final ``OUTPUT/model`` folders hold the same files, in the
layout the run started from, and equal weights; rank 0 alone prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vl_model.testing import make_official_checkpoint

_COMMON = [
    "--set",
    "train.max_steps=2",
    "--set",
    "train.save_every=0",
    "--set",
    "train.plot=false",
    "--set",
    "data.size=16",
]


def _run(
    args: list[str], *, ranks: int = 1, module: str = "vl_train", path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path is not None:  # where the recipe's own modules are
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [os.environ.get("PYTHONPATH")])])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command = (launcher if ranks > 1 else [sys.executable]) + ["-m", module, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["data", "context", "expert"])
def test_torchrun_cli_equals_one_process(tmp_path: Path, parallelism: str) -> None:
    if parallelism == "data":
        recipe, two, one = ["demo_s0"], [], ["--set", "train.grad_accum_steps=2"]
    else:
        moe = parallelism == "expert"
        checkpoint = make_official_checkpoint(tmp_path / "official", moe=moe)
        recipe = [
            "demo_sft",
            "--init-from",
            str(checkpoint),
            "--set",
            "train.activation_checkpointing=false",
            "--set",
            "optim.lr=1e-2",
        ]
        two = ["--set", f"train.{parallelism}_parallel=2"]
        one = ["--set", "train.grad_accum_steps=2"] if moe else []  # EP ranks see their own batches; CP ranks share
    parallel = _run([*recipe, *_COMMON, *two, "--output", str(tmp_path / "two")], ranks=2)
    _run([*recipe, *_COMMON, *one, "--output", str(tmp_path / "one")])

    assert parallel.stdout.count("vl-train: stopped after 2 steps") == 1, parallel.stdout  # rank 0 alone reports
    assert "2 ranks" in parallel.stdout
    files = sorted(p.name for p in (tmp_path / "one" / "model").iterdir())
    assert sorted(p.name for p in (tmp_path / "two" / "model").iterdir()) == files
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    # Adam turns the reductions' rounding in tiny gradients into differences of ~1e-5 (0.1% of a step at lr 1e-2)
    atol = 0.0 if parallelism == "data" else 1e-4
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0.0, atol=atol, msg=name)
    losses = [_losses(tmp_path / run) for run in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    assert losses[0][0] != losses[0][-1], "the step changed nothing: the comparison would see no difference"


def _losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_rl_cli_with_a_kl_reference_ends_in_an_official_checkpoint(tmp_path: Path) -> None:
    import transformers

    checkpoint = make_official_checkpoint(tmp_path / "official")
    (tmp_path / "length_reward.py").write_text(
        "def score(prompt, response, sample):\n    return len(response) / 10  # spread inside every group\n"
    )
    recipe = tmp_path / "rl.toml"
    recipe.write_text(
        """
[model]
max_pixels = 16384
[data]
kind = "synthetic"
tasks = ["count"]
size = 8
image_size_range = [64, 96]
[optim]
lr = 1e-3
[rl]
method = "grpo"
kl_coef = 0.05
group_size = 4
prompts_per_step = 2
mini_batches = 1
max_new_tokens = 8
temperature = 1.5
thinking = false
max_steps = 2
eval_every = 0
save_every = 0
plot = false
progress = false
[reward]
function = "length_reward:score"
format_weight = 0.0
"""
    )
    args = [str(recipe), "--init-from", str(checkpoint), "--output", str(tmp_path / "rl")]
    done = _run(args, ranks=2, module="vl_rl", path=tmp_path)
    assert done.stdout.count("vl-rl: stopped after 2 steps") == 1, done.stdout + done.stderr
    steps = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2], steps
    updates = [r for r in steps if not r.get("no_signal")]
    assert updates and all(r["kl"] >= 0.0 for r in updates), steps  # the KL to the frozen starting policy
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "rl" / "model"))
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "loss"), [("off_policy", "forward_kl"), ("on_policy", "reverse_kl")])
def test_torchrun_distill_cli(tmp_path: Path, mode: str, loss: str) -> None:
    """``torchrun -m vl_train demo_distill`` on 2 ranks: off-policy equals one process with 2 accumulated
    micro-batches (each rank takes its share of the stream); on-policy (sampling differs) finishes."""
    from vl_train.builders import build_model
    from vl_train.testing import TINY_TEXT, TINY_VISION

    teacher, processor = build_model({"tokenizer": "demo", "seed": 5, "text": TINY_TEXT, "vision": TINY_VISION})
    teacher.save_pretrained(str(tmp_path / "teacher"))
    processor.save_pretrained(str(tmp_path / "teacher"))
    recipe = ["demo_distill", *_COMMON, "--set", f"teacher.model={tmp_path / 'teacher'}"]
    recipe += ["--set", f"teacher.mode={mode}", "--set", f"teacher.loss={loss}", "--set", "teacher.max_new_tokens=4"]
    recipe += ["--set", "train.micro_batch_size=2", "--set", "train.activation_checkpointing=false"]
    parallel = _run([*recipe, "--output", str(tmp_path / "two")], ranks=2)
    assert parallel.stdout.count("vl-train: stopped after 2 steps") == 1, parallel.stdout
    assert (tmp_path / "two" / "model" / "config.json").is_file()
    if mode == "on_policy":
        assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "two"))))
        return
    _run([*recipe, "--set", "train.grad_accum_steps=2", "--output", str(tmp_path / "one")])
    losses = [_losses(tmp_path / run) for run in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    assert losses[0][0] != losses[0][-1], "the step changed nothing: the comparison would see no difference"
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
