"""Question: is vl_vision's VisionTransformer faster than transformers' Qwen3VLVisionModel on CPU?

Case from the issue: 8 images of mixed sizes (224 to 896 px, grid = px / 16) through small
towers (``CONFIGS``: depth 4 / width 256 and depth 2 / width 128, two DeepStack taps), both with
the same weights, transformers with ``attn_implementation="sdpa"``. Rows: forward (no grad)
and forward + backward. Outputs are checked equal (float32, 1e-4) before timing. Peak memory
(in the note) is the peak of live tensor storage during one call, counted by a dispatch mode
(``benchmarks/_memory.py``): deterministic, unlike RSS on a shared machine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare
from benchmarks._memory import peak_tensor_mb
from vl_vision import VisionConfig

# The case (depth 4, width 256) and a smaller tower, where the reference's fixed overheads
# (Conv3d patch embedding, RoPE, position table) weigh more against the compute-bound blocks.
CONFIGS = {
    "depth 4, width 256": VisionConfig(
        depth=4,
        hidden_size=256,
        num_heads=4,
        intermediate_size=1024,
        out_hidden_size=512,
        deepstack_visual_indexes=[1, 3],
    ),
    "depth 2, width 128": VisionConfig(
        depth=2,
        hidden_size=128,
        num_heads=2,
        intermediate_size=512,
        out_hidden_size=256,
        deepstack_visual_indexes=[0, 1],
    ),
}

# (height px, width px) of the 8 images
SIZES = [(224, 224), (224, 448), (448, 448), (448, 448), (672, 672), (896, 896), (320, 512), (512, 512)]
HF_FIELDS = (
    "depth",
    "hidden_size",
    "hidden_act",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "out_hidden_size",
    "num_position_embeddings",
    "deepstack_visual_indexes",
)


def _towers(
    config: VisionConfig, sizes: list[tuple[int, int]]
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``(theirs, ours, pixel_values, grid)`` with the same weights (transformers' init, copied)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from vl_vision import VisionTransformer

    torch.manual_seed(0)
    grid = torch.tensor([[1, h // 16, w // 16] for h, w in sizes])
    hf_cfg = Qwen3VLVisionConfig(**{f: getattr(config, f) for f in HF_FIELDS})
    hf_cfg._attn_implementation = "sdpa"
    theirs = Qwen3VLVisionModel(hf_cfg).float().eval()
    ours = VisionTransformer(config).float().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(int(grid.prod(-1).sum()), config.patch_dim)
    return theirs, ours, x, grid


def _calls(
    theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, grid: torch.Tensor
) -> dict[tuple[str, str], Callable[[], object]]:
    """``(mode, side) -> fn`` for mode in forward / forward+backward and side in theirs / ours."""

    def fwd_theirs() -> object:
        with torch.no_grad():
            return theirs(x, grid_thw=grid).pooler_output

    def fwd_ours() -> object:
        with torch.no_grad():
            return ours(x, grid).merged

    def bwd_theirs() -> None:
        theirs.zero_grad(set_to_none=True)
        out = theirs(x, grid_thw=grid)
        (out.pooler_output.square().mean() + sum(d.square().mean() for d in out.deepstack_features)).backward()

    def bwd_ours() -> None:
        ours.zero_grad(set_to_none=True)
        out = ours(x, grid)
        (out.merged.square().mean() + sum(d.square().mean() for d in out.deepstack)).backward()

    return {
        ("forward", "theirs"): fwd_theirs,
        ("forward", "ours"): fwd_ours,
        ("forward+backward", "theirs"): bwd_theirs,
        ("forward+backward", "ours"): bwd_ours,
    }


def run(quick: bool) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_vision_tower: transformers is not installed; no baseline to compare against")
        return []
    sizes = SIZES[:4] if quick else SIZES
    rows = []
    for name, config in CONFIGS.items():
        theirs, ours, x, grid = _towers(config, sizes)
        with torch.no_grad():
            want, got = theirs(x, grid_thw=grid), ours(x, grid)
        torch.testing.assert_close(got.merged, want.pooler_output, rtol=1e-4, atol=1e-4)
        for a, b in zip(got.deepstack, want.deepstack_features, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        calls = _calls(theirs, ours, x, grid)
        case = f"{len(sizes)} images {sizes[0][0]}-{max(max(s) for s in sizes)} px ({x.shape[0]} patches), {name}"
        for mode in ("forward", "forward+backward"):
            mem_theirs = peak_tensor_mb(calls[(mode, "theirs")])
            mem_ours = peak_tensor_mb(calls[(mode, "ours")])
            rows.append(
                compare(
                    "vision tower (CPU)",
                    f"{mode}: {case}",
                    baseline="transformers Qwen3VLVisionModel (sdpa)",
                    baseline_fn=calls[(mode, "theirs")],
                    ours_fn=calls[(mode, "ours")],
                    warmup=1,
                    repeat=3 if quick else 7,
                    note=(f"peak tensor memory of one call: transformers {mem_theirs:.0f} MB, ours {mem_ours:.0f} MB"),
                )
            )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x ({row.note})")
