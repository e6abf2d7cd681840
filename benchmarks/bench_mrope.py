"""Question: is vl_rope.MRoPE's cos/sin at least as fast as transformers' Qwen3-VL rotary embedding?

Case from the issue: position ids [3, 8, 8192] (Qwen3-VL: head_dim 128, theta 5e6,
interleaved [24, 20, 20]); also Qwen2-VL's chunked layout. Both sides produce
float32 cos/sin [8, 8192, 128]; outputs are checked equal before timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare


def run(quick: bool) -> list[Row]:
    try:
        import transformers
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    except ImportError:
        print("bench_mrope: transformers is not installed; no baseline to compare against")
        return []
    from vl_rope import MRoPE

    positions = torch.randint(0, 8192, (3, 8, 8192), generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, dtype=torch.float32)
    qwen3 = transformers.Qwen3VLTextConfig(
        head_dim=128,
        hidden_size=4096,
        num_attention_heads=32,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]},
    )
    qwen2 = transformers.Qwen2VLTextConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    cases = [
        ("Qwen3-VL interleaved [24,20,20]", Qwen3VLTextRotaryEmbedding(qwen3), MRoPE(128, 5e6, [24, 20, 20])),
        (
            "Qwen2-VL chunked [16,24,24]",
            Qwen2VLRotaryEmbedding(qwen2),
            MRoPE(128, 1e6, [16, 24, 24], interleaved=False),
        ),
    ]
    rows = []
    for name, theirs, ours in cases:
        want, got = theirs(x, positions), ours(positions)
        if not all(torch.equal(a, b) for a, b in zip(want, got, strict=True)):
            raise AssertionError(f"cos/sin differ for {name}")
        rows.append(
            compare(
                "MRoPE cos/sin",
                f"{name}, positions [3, 8, 8192]",
                baseline=f"transformers {type(theirs).__name__}",
                baseline_fn=lambda theirs=theirs: theirs(x, positions),
                ours_fn=lambda ours=ours: ours(positions),
                repeat=5 if quick else 15,
            )
        )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x")
