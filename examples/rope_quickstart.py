"""vl-rope in one screen: Qwen3-VL multimodal positions, interleaved MRoPE with YaRN, attention.

Builds one chat-like row with an image and a two-patch video (Qwen3-VL token layout,
timestamps before each temporal patch), computes its (T, H, W) position ids, turns them
into MRoPE cos/sin (with YaRN stretching 256K to 1M), rotates queries and keys, runs
attention, and continues the positions for generated tokens. Run: ``python examples/rope_quickstart.py``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vl_rope import MRoPE, RopeScaling, apply_rotary, decode_position_ids, get_rope_index

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653


def build_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_grid = torch.tensor([[1, 6, 8]])  # 6x8 patches -> 3x4 = 12 tokens after the 2x2 merge
    video_grid = torch.tensor([[2, 4, 4]])  # 2 temporal patches of 4x4 patches -> 4 tokens each
    ids = [10, 11, 12, START, *[IMAGE] * 12, END]
    for timestamp_tokens in ([21, 22], [23, 22]):  # stand-ins for the tokenised "<0.5 seconds>", "<1.5 seconds>"
        ids += timestamp_tokens
        ids += [START, *[VIDEO] * 4, END]
    ids += [30, 31, 32]
    return torch.tensor([ids]), image_grid, video_grid


def main() -> None:
    input_ids, image_grid, video_grid = build_row()
    position_ids, deltas = get_rope_index(input_ids, image_grid_thw=image_grid, video_grid_thw=video_grid)
    names = {IMAGE: "img", VIDEO: "vid", START: "<vs>", END: "</vs>"}
    print("token  T  H  W")
    for i, tok in enumerate(input_ids[0].tolist()):
        t, h, w = position_ids[:, 0, i].tolist()
        print(f"{names.get(tok, 'txt'):>5} {t:2d} {h:2d} {w:2d}")
    print(f"rope delta for generation: {int(deltas)}")

    yarn = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    mrope = MRoPE(head_dim=128, theta=5e6, mrope_section=[24, 20, 20], scaling=yarn)
    cos, sin = mrope(position_ids)
    q = torch.randn(1, 16, input_ids.shape[1], 128)  # [B, Hq, L, D]
    k = torch.randn(1, 2, input_ids.shape[1], 128)  # [B, Hk, L, D] (GQA)
    q, k = apply_rotary(q, k, cos, sin)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(8, 1), k.repeat_interleave(8, 1), is_causal=True)
    print(f"attention output {tuple(out.shape)}, YaRN attention factor {mrope.attention_factor:.4f}")

    nxt = decode_position_ids(deltas, past_length=input_ids.shape[1], num_new=3)
    print(f"positions of the next 3 generated tokens: {nxt[0, 0].tolist()}")

    start = time.perf_counter()
    big = input_ids.repeat(32, 200)  # 32 rows x ~8K tokens, 200 images and 200 videos per row
    get_rope_index(big, image_grid_thw=image_grid.repeat(6400, 1), video_grid_thw=video_grid.repeat(6400, 1))
    print(f"get_rope_index on {big.numel():,} tokens: {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
