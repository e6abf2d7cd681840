"""The model sections of the GPU run: the vision tower and the assembled VLM against transformers, bf16.

Vision: the SigLIP-2 SO-400M tower of Qwen3-VL (27 blocks, width 1152, 16 heads, MLP 4304,
DeepStack taps 8/16/24, out 2048) on a batch of images of mixed sizes, ours (``flash`` varlen
attention if ``flash_attn`` is installed, else SDPA) against transformers' ``Qwen3VLVisionModel``
(SDPA) with the same weights: outputs compared (relative error), then forward and forward +
backward timed with events.

VLM: a Qwen3-VL-2B-sized model (text: hidden 2048, 28 layers, 16 heads, 8 KV heads, MLP 6144;
vision: 24 blocks of width 1024, out 2048) written once with ``save_pretrained`` from transformers'
``Qwen3VLForConditionalGeneration`` (random init on the GPU) and loaded by both sides, bf16, SDPA:
one training step (forward + backward, labels on the answer tail) on a row with two 448 px
images, and greedy decoding of ``new_tokens`` from a one-image prompt (the agreement of the
generated ids is reported: in bf16 the two may part after a near-tie).
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.timing import bench_ms, wall_ms

IMAGE, VISION_START, VISION_END = 151655, 151652, 151653


@dataclass
class VisionShape:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 2048
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    sizes: tuple[tuple[int, int], ...] = ((448, 448), (896, 896), (672, 1344), (896, 672), (1344, 896), (448, 896))
    dtype: torch.dtype = torch.bfloat16


@dataclass
class ModelShape:
    text: dict[str, Any] = field(
        default_factory=lambda: {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20]},
        }
    )
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 2048,
            "deepstack_visual_indexes": [5, 11, 17],
        }
    )
    seq: int = 4096
    answer: int = 512
    new_tokens: int = 32
    image_px: int = 448
    dtype: torch.dtype = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def vision_tower(shape: VisionShape, device: str) -> dict[str, Any]:
    """``{patches, attention, rel_error, rows: [{mode, theirs_ms, ours_ms}]}``."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from vl_vision import VisionConfig, VisionTransformer

    fields = {k: getattr(shape, k) for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                              "out_hidden_size", "deepstack_visual_indexes")}  # fmt: skip
    attention = "flash" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    config = VisionConfig(**fields, attn_implementation=attention)
    hf_config = Qwen3VLVisionConfig(**fields)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        theirs = Qwen3VLVisionModel(hf_config).to(shape.dtype).eval()
        ours = VisionTransformer(config).to(shape.dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    grid = torch.tensor([[1, h // 16, w // 16] for h, w in shape.sizes], device=device)
    x = torch.randn(int(grid.prod(-1).sum()), config.patch_dim, device=device).to(shape.dtype)
    with torch.no_grad():
        want, got = theirs(x, grid_thw=grid).pooler_output, ours(x, grid).merged
    result: dict[str, Any] = {"patches": x.shape[0], "attention": attention, "rel_error": _rel(got, want), "rows": []}

    def fwd(model: torch.nn.Module, is_ours: bool) -> Any:
        def call() -> object:
            with torch.no_grad():
                return model(x, grid) if is_ours else model(x, grid_thw=grid)

        return call

    def fwd_bwd(model: torch.nn.Module, is_ours: bool) -> Any:
        def call() -> None:
            model.zero_grad(set_to_none=True)
            out = model(x, grid).merged if is_ours else model(x, grid_thw=grid).pooler_output
            out.float().square().mean().backward()

        return call

    for mode, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        theirs_ms, _ = bench_ms(make(theirs, False), device=device, rep_ms=200.0, graph=False)
        ours_ms, _ = bench_ms(make(ours, True), device=device, rep_ms=200.0, graph=False)
        result["rows"].append({"mode": mode, "theirs_ms": theirs_ms, "ours_ms": ours_ms})
        print(f"  vision {mode}: transformers {theirs_ms:.2f} ms, ours {ours_ms:.2f} ms ({theirs_ms / ours_ms:.2f}x)")
    del theirs, ours
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _row(shape: ModelShape, images: int, seq: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    side = shape.image_px // 16
    grid = torch.tensor([[1, side, side]] * images, device=device)
    image_tokens = side * side // 4
    text = seq - images * (image_tokens + 2)
    ids = torch.randint(0, 150000, (text,), generator=gen).tolist()
    pieces, cut = [], text // (images + 1)
    for n in range(images):
        pieces += ids[n * cut : (n + 1) * cut] + [VISION_START] + [IMAGE] * image_tokens + [VISION_END]
    pieces += ids[images * cut :]
    input_ids = torch.tensor([pieces], device=device)
    patch_dim = 3 * 2 * 16 * 16
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen).to(device, shape.dtype),
        "image_grid_thw": grid,
    }


def vl_model(shape: ModelShape, device: str) -> dict[str, Any]:
    """``{params, loss_theirs, loss_ours, rows: [...], ids_agree}``: training step and greedy decoding."""
    import transformers

    from vl_model import VLForConditionalGeneration

    config = transformers.Qwen3VLConfig(text_config=shape.text, vision_config=shape.vision, image_token_id=IMAGE,
                                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                                        tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):
            transformers.Qwen3VLForConditionalGeneration(config).to(shape.dtype).save_pretrained(tmp)
        gc.collect()
        kwargs = {"dtype": shape.dtype, "attn_implementation": "sdpa"}
        theirs = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp, **kwargs).to(device)
        ours = VLForConditionalGeneration.from_pretrained(Path(tmp), **kwargs).to(device)
    params = sum(p.numel() for p in ours.parameters())
    gen = torch.Generator().manual_seed(1)
    row = _row(shape, 2, shape.seq, device, gen)
    labels = row["input_ids"].clone()
    labels[:, : shape.seq - shape.answer] = -100

    def step(model: torch.nn.Module) -> Any:
        def call() -> float:
            model.zero_grad(set_to_none=True)
            loss = model(**row, labels=labels).loss
            loss.backward()
            return float(loss.detach())

        return call

    for model in (theirs, ours):
        model.train()
    loss_theirs, loss_ours = step(theirs)(), step(ours)()
    result: dict[str, Any] = {"params": params, "loss_theirs": loss_theirs, "loss_ours": loss_ours, "rows": []}
    theirs_ms = wall_ms(step(theirs), device=device)
    ours_ms = wall_ms(step(ours), device=device)
    result["rows"].append({"mode": f"training step, {shape.seq} tokens, 2 images", "theirs_ms": theirs_ms,
                           "ours_ms": ours_ms})  # fmt: skip
    print(f"  vl-model train step: transformers {theirs_ms:.1f} ms, ours {ours_ms:.1f} ms ({theirs_ms / ours_ms:.2f}x)")
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        model.eval()
    prompt = _row(shape, 1, (shape.image_px // 32) ** 2 + 2 + 100, device, gen)

    def generate(model: torch.nn.Module) -> Any:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return model.generate(**prompt, max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens,
                                      do_sample=False)  # fmt: skip

        return call

    want, got = generate(theirs)(), generate(ours)()
    new = prompt["input_ids"].shape[1]
    result["ids_agree"] = int((want[0, new:] == got[0, new:]).cumprod(0).sum())
    theirs_ms = wall_ms(generate(theirs), device=device, repeat=2)
    ours_ms = wall_ms(generate(ours), device=device, repeat=2)
    result["rows"].append({"mode": f"greedy decoding, {shape.new_tokens} new tokens", "theirs_ms": theirs_ms,
                           "ours_ms": ours_ms})  # fmt: skip
    print(f"  vl-model generate: transformers {theirs_ms:.1f} ms, ours {ours_ms:.1f} ms ({theirs_ms / ours_ms:.2f}x)")
    del theirs, ours
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result
