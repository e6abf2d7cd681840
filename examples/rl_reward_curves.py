"""Reward curves of SAPO and GSPO on the synthetic counting task, several seeds each (issue 7's acceptance run).

1. A tiny SFT'd starting model: the packaged ``vl-train demo_sft`` recipe from a fresh tiny model, restricted
   to the counting task in the non-thinking format and stopped early (cached in ``OUT/sft``).
2. For each method and seed: :class:`vl_rl.RLTrainer` from that model on training prompts, with the
   held-out reward (mean of ``--eval-k`` sampled responses per held-out prompt at the training temperature,
   and greedy) measured before and after.
3. ``OUT/report.md`` (table: method, seed, before, after, delta; mean and std of the deltas) and
   ``OUT/reward_curves.png``.

Usage (about 1 minute per run on one CPU core)::

    OMP_NUM_THREADS=1 python examples/rl_reward_curves.py --seeds 0 1 2 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vl_rl.config import RLConfig
from vl_rl.evaluate import evaluate
from vl_rl.trainer import RLTrainer
from vl_train import Trainer, stage
from vl_train.builders import build_data, build_model
from vl_train.data.synthetic import SyntheticDataset, verify
from vl_train.testing import TINY_TEXT, TINY_VISION

IMAGES = (48, 64)


def sft_model(out: Path, steps: int) -> Path:
    """SFT (once) a fresh tiny model on counting only; return the run folder (its ``model/`` holds the result)."""
    folder = out / "sft"
    if not (folder / "model" / "config.json").is_file():
        model, processor = build_model(
            {"tokenizer": "demo", "max_pixels": 4096, "text": TINY_TEXT, "vision": TINY_VISION}
        )
        config = stage("SFT").replace(
            optim={"lr": 2e-3, "lr_vision": 2e-3, "warmup_steps": 5},
            max_steps=steps,
            max_length=512,
            micro_batch_size=4,
            activation_checkpointing=False,
            save_every=0,
            progress=False,
            tensorboard=False,
            output_dir=str(folder),
        )
        data = {
            "kind": "synthetic",
            "tasks": ["count"],
            "thinking": 0.0,
            "size": 2000,
            "image_size_range": list(IMAGES),
        }
        print(f"SFT on counting: {steps} steps into {folder}")
        Trainer(model, config, build_data(data, processor, config)).train()
        model.save_pretrained(str(folder / "model"))
        processor.save_pretrained(str(folder / "model"))
    return folder


def load(folder: Path) -> tuple[Any, Any]:
    return build_model({"init_from": str(folder), "max_pixels": 4096})


def run(method: str, seed: int, args: argparse.Namespace, sft: Path, held: list[dict[str, Any]]) -> dict[str, Any]:
    model, processor = load(sft)
    train = list(SyntheticDataset("train", size=1024, seed=1, tasks=["count"], image_size_range=IMAGES, thinking=0))
    config = RLConfig(
        method=method,
        group_size=args.group_size,
        prompts_per_step=args.prompts,
        mini_batches=2,
        optim={"lr": args.lr, "warmup_steps": 2, "min_lr_ratio": 0.1},  # the decay its measured curves used
        max_new_tokens=4,
        temperature=1.0,
        thinking=False,
        max_steps=args.steps,
        eval_every=args.eval_every,
        eval_greedy=False,
        eval_samples_per_prompt=args.eval_k,
        seed=seed,
        output_dir=str(args.out / f"{method}_seed{seed}"),
        progress=False,
    )
    greedy_before = evaluate(model, processor, held, verify, max_new_tokens=4, thinking=False).mean
    start = time.perf_counter()
    result = RLTrainer(model, processor, config, train, verify, eval_samples=held).train()
    seconds = time.perf_counter() - start
    greedy_after = evaluate(model, processor, held, verify, max_new_tokens=4, thinking=False).mean
    before, after = result.eval_history[0]["eval_reward"], result.eval_history[-1]["eval_reward"]
    row = {
        "method": method,
        "seed": seed,
        "before": before,
        "after": after,
        "delta": after - before,
        "greedy_before": greedy_before,
        "greedy_after": greedy_after,
        "seconds": seconds,
        "curve": [(e["step"], e["eval_reward"]) for e in result.eval_history],
        "train": [(r["step"], r.get("reward_mean")) for r in result.records],
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "train")}))
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"sapo": "tab:blue", "gspo": "tab:orange"}
    for row in rows:
        c = colours.get(row["method"], "tab:gray")
        label = f"{row['method']} seed {row['seed']}"
        axes[0].plot(*zip(*row["curve"], strict=True), marker="o", color=c, alpha=0.8, label=label)
        train = [(s, r) for s, r in row["train"] if r is not None]
        axes[1].plot(*zip(*train, strict=True), color=c, alpha=0.5)
    axes[0].set_title("held-out reward (sampled, T=1)")
    axes[1].set_title("train reward per step (sampled)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    lines = [
        "# RL reward curves on the synthetic counting task",
        "",
        f"Command: `OMP_NUM_THREADS=1 python examples/rl_reward_curves.py --seeds {' '.join(map(str, args.seeds))} "
        f"--steps {args.steps} --lr {args.lr} --group-size {args.group_size} --prompts {args.prompts}`",
        "",
        f"Held-out: {args.heldout} counting prompts; reward = `vl_train.data.synthetic.verify`; 'before'/'after' = mean "
        f"reward of {args.eval_k} sampled responses (T=1) per prompt; greedy columns = one greedy response per prompt.",
        "",
        f"Reading the greedy columns: the most frequent count is the answer of {args.modal:.3f} of the held-out",
        "prompts; a greedy reward equal to that share means the greedy policy answers that count everywhere, and a",
        "rise of the sampled reward up to that share comes from the answer format and the answer distribution,",
        "beyond it from counting.",
        "",
        "| method | seed | before | after | delta | greedy before | greedy after | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['delta']:+.3f} | "
            f"{r['greedy_before']:.3f} | {r['greedy_after']:.3f} | {r['seconds']:.0f} |"
        )
    lines.append("")
    for method in dict.fromkeys(r["method"] for r in rows):
        deltas = [r["delta"] for r in rows if r["method"] == method]
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        lines.append(f"- {method}: delta mean {statistics.mean(deltas):+.3f}, std {std:.3f} over {len(deltas)} seeds")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sapo", "gspo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-k", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/rl_curves"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plot from results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    held = list(
        SyntheticDataset("heldout", size=args.heldout, seed=0, tasks=["count"], image_size_range=IMAGES, thinking=0)
    )
    if args.report_only:
        rows = json.loads((args.out / "results.json").read_text())
    else:
        sft = sft_model(args.out, args.sft_steps)
        rows = [run(m, s, args, sft, held) for m in args.methods for s in args.seeds]
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    answers = [s["answer"] for s in held]
    args.modal = max(answers.count(a) for a in set(answers)) / len(answers)
    report(rows, args, args.out / "report.md")
    plot(rows, args.out / "reward_curves.png")
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out / 'report.md'} and {args.out / 'reward_curves.png'}")


if __name__ == "__main__":
    main()
