"""The GPU run's report: a RESULTS.md fragment (markdown) from the sections' results, and the smoke sizes.

The fragment names the date, the GPU, the versions and the command, then one table per section,
and checks the issue's targets (stated for an H200; the GPU that ran is named next to them):
MoE forward >= 450 TFLOP/s and forward + backward >= 380 TFLOP/s at 16K tokens of the 30B-A3B
layer, 1-token decode <= 30 us under CUDA graphs, >= 1.3x transformers' grouped_mm from 4K tokens.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from benchmarks.gpu.models import ModelShape, VisionShape
from benchmarks.gpu.moe import MoEShape

TARGETS = {"fwd_tflops_16k": 450.0, "fwd_bwd_tflops_16k": 380.0, "decode_us": 30.0, "vs_grouped_mm": 1.3}


def smoke_moe_shape() -> MoEShape:
    return MoEShape(hidden=32, inter=16, experts=4, top_k=2, tokens=(5, 1), layers=4, dtype=torch.float32,
                    check_tokens=12, profile_tokens=8, min_backward_tokens=4)  # fmt: skip


def smoke_vision_shape() -> VisionShape:
    return VisionShape(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                       deepstack_visual_indexes=[0, 1], sizes=((64, 64), (32, 64)), dtype=torch.float32)  # fmt: skip


def smoke_model_shape() -> ModelShape:
    text = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2]}}  # fmt: skip
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64,
              "deepstack_visual_indexes": [0, 1]}  # fmt: skip
    return ModelShape(text=text, vision=vision, seq=160, answer=16, new_tokens=3, image_px=64, dtype=torch.float32)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """``(target, measured, met)``; ``met`` is ``None`` where the grid has no row for it."""

    def pick(tokens: int, mode: str, impl: str, routing: str = "router") -> dict[str, Any] | None:
        found = [r for r in rows if (r["tokens"], r["mode"], r["impl"], r["routing"]) == (tokens, mode, impl, routing)]
        return found[0] if found else None

    out: list[tuple[str, str, bool | None]] = []
    for mode, key in (("fwd", "fwd_tflops_16k"), ("fwd+bwd", "fwd_bwd_tflops_16k")):
        row = pick(16384, mode, "ours")
        got = f"{row['tflops']:.0f} TFLOP/s" if row else "not measured"
        out.append((f"MoE {mode} at 16K tokens >= {TARGETS[key]:.0f} TFLOP/s", got,
                    None if row is None else row["tflops"] >= TARGETS[key]))  # fmt: skip
    row = pick(1, "fwd", "ours")
    got = f"{row['ms'] * 1e3:.1f} us ({row['method']})" if row else "not measured"
    out.append((f"1-token decode <= {TARGETS['decode_us']:.0f} us", got,
                None if row is None else row["ms"] * 1e3 <= TARGETS["decode_us"]))  # fmt: skip
    ratios = []
    for ours in (r for r in rows if r["impl"] == "ours" and r["tokens"] >= 4096):
        base = pick(ours["tokens"], ours["mode"], "grouped_mm", ours["routing"])
        if base:
            ratios.append((base["ms"] / ours["ms"], f"T={ours['tokens']} {ours['routing']} {ours['mode']}"))
    worst = min(ratios) if ratios else None
    out.append((f">= {TARGETS['vs_grouped_mm']}x grouped_mm from 4K tokens",
                f"worst {worst[0]:.2f}x ({worst[1]})" if worst else "not measured",
                None if worst is None else worst[0] >= TARGETS["vs_grouped_mm"]))  # fmt: skip
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(results: dict[str, Any], peaks: dict[str, float], started: datetime.datetime, command: str,
             failed: list[str]) -> str:  # fmt: skip
    v = results.get("versions", {})
    lines = [
        f"## GPU run {started:%Y-%m-%d %H:%M} UTC: {v.get('gpu', 'no GPU (CPU smoke run)')}",
        "",
        f"Command: `{command}` at commit {v.get('commit', '?')}. Versions: python {v.get('python')}, torch "
        f"{v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"driver {v.get('driver', '-')}. Measured ceilings: {peaks['tflops']:.0f} TFLOP/s bf16 matmul, "
        f"{peaks['tbps']:.2f} TB/s copy. Failed sections: {', '.join(failed) or 'none'}.",
        "",
    ]
    tests = results.get("tests") or {}
    if tests:
        lines += [f"**Tests** (`{tests.get('command', '')}`): {tests.get('summary', tests)}", ""]
    grads = results.get("moe_gradients") or {}
    if "relative_error" in grads:
        errs = ", ".join(f"{k} {val:.1e}" for k, val in grads["relative_error"].items())
        verdict = "pass" if grads["ok"] else "FAIL"
        lines += [f"**MoE gradients** at {grads['tokens']} tokens ({grads['config']}): relative error vs float32 "
                  f"autograd {errs} (limit {grads['limit']:.0e}): {verdict}.", ""]  # fmt: skip
    rows = results.get("moe_timings") or []
    if isinstance(rows, list) and rows:
        body = []
        for r in (r for r in rows if r["impl"] == "ours"):
            base = {b["impl"]: b["ms"] for b in rows if (b["tokens"], b["routing"], b["mode"]) ==
                    (r["tokens"], r["routing"], r["mode"]) and b["impl"] != "ours"}  # fmt: skip
            body.append([str(r["tokens"]), r["routing"], r["mode"], f"{r['ms'] * 1e3:.1f}", f"{r['tflops']:.0f}",
                         f"{r['roofline_ms'] / r['ms']:.0%}",
                         *(f"{base[k] / r['ms']:.2f}x" if k in base else "-" for k in ("grouped_mm", "eager")),
                         r["method"]])  # fmt: skip
        lines += ["**MoE layer** (30B-A3B shape, weights rotated over 4 layers):", ""]
        lines += _table(["T", "routing", "mode", "ours us", "TFLOP/s", "of roofline", "vs grouped_mm", "vs eager",
                         "timer"], body)  # fmt: skip
        lines += ["", "**Targets** (stated for an H200; measured on the GPU above):", ""]
        lines += _table(["target", "measured", "met"],
                        [[t, m, {True: "yes", False: "no", None: "-"}[ok]] for t, m, ok in targets(rows)])  # fmt: skip
        lines.append("")
    prof = results.get("moe_profile") or []
    if isinstance(prof, list) and prof:
        lines += ["**Per-kernel profile** (ours, forward + backward):", ""]
        lines += _table(["kernel", "calls", "total us", "share"],
                        [[p["kernel"], str(p["calls"]), f"{p['total_us']:.0f}", f"{p['share']:.0%}"] for p in prof])  # fmt: skip
        lines.append("")
    for key, title in (("vision_tower", "Vision tower"), ("vl_model", "VLM")):
        res = results.get(key) or {}
        if "rows" in res:
            extra = {k: val for k, val in res.items() if k != "rows"}
            lines += [f"**{title}** vs transformers ({extra}):", ""]
            lines += _table(["case", "transformers ms", "ours ms", "speed-up"],
                            [[r["mode"], f"{r['theirs_ms']:.2f}", f"{r['ours_ms']:.2f}",
                              f"{r['theirs_ms'] / r['ours_ms']:.2f}x"] for r in res["rows"]])  # fmt: skip
            lines.append("")
    for key, res in results.items():
        if isinstance(res, dict) and ("error" in res or "skipped" in res):
            lines.append(f"- {key}: {res.get('error') or res.get('skipped')}")
    return "\n".join(lines) + "\n"
