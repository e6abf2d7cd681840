"""Tiny tokenizer, processor, hand-built samples and a tiny random VLM for the vl-train data tests."""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import PIL.Image
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
_WORDS = [
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "a",
    "helpful",
    "describe",
    "this",
    "image",
    "video",
    "what",
    "is",
    "in",
    "the",
    "and",
    "of",
    "it",
    "with",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "square",
    "circle",
    "seconds",
    "think",
    "answer",
    "how",
    "many",
    "left",
    "right",
    "first",
    "second",
    "yes",
    "no",
]
PATCH = 4  # must match the tiny model's vision config (tests/vl_model/_core_helpers.py)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with character fallback and Qwen3-VL's special tokens, built in memory."""
    pieces = ["<unk>", "\n", " ", *(string.ascii_letters + string.digits + string.punctuation)]
    pieces += [w for w in _WORDS if w not in pieces]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.NFC()
    words = sorted((w for w in vocab if len(w) > 1 and w != "<unk>"), key=len, reverse=True)
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex("(?:" + "|".join(words) + ")(?![A-Za-z_])|[\\s\\S]"), behavior="isolated"
    )
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def make_processor() -> Any:
    """A ``VLProcessor`` with the tiny tokenizer and 4-pixel patches (a 16x16 image -> 4 merged tokens)."""
    from vl_model import VLProcessor
    from vl_vision.processing import ImageProcessor, VideoProcessor

    budget = {"patch_size": PATCH, "min_pixels": 8 * 8 * 4, "max_pixels": 8 * 8 * 16}
    return VLProcessor(
        ImageProcessor(**budget, num_threads=1),
        VideoProcessor(**budget, fps=2.0, min_frames=2, max_frames=8, num_threads=1),
        make_tokenizer(),
    )


def image(h: int = 16, w: int = 16, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def frames(n: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> list[PIL.Image.Image]:
    return [image(h, w, seed + k) for k in range(n)]


def text_sample(sid: str = "t0", answer: str = "yes", question: str = "is it red?") -> dict[str, Any]:
    return {
        "id": sid,
        "task": "text",
        "messages": [
            {"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def image_sample(sid: str = "i0", img: Any = None, answer: str = "a red square", **extra: Any) -> dict[str, Any]:
    content = [{"type": "image", "image": image() if img is None else img}, {"type": "text", "text": "describe"}]
    return {
        "id": sid,
        "task": "caption",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
        **extra,
    }


def video_sample(sid: str = "v0", n_frames: int = 4, answer: str = "a cat at 1 seconds") -> dict[str, Any]:
    content = [{"type": "video", "video": frames(n_frames), "fps": 2.0}, {"type": "text", "text": "what"}]
    return {
        "id": sid,
        "task": "video",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }


def tiny_model(processor: Any, seed: int = 0) -> Any:
    """A random fp32 ``VLForConditionalGeneration`` (tests/vl_model's tiny config) with the tokenizer's ids."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "vl_model"))
    from _core_helpers import hf_config_dict

    from vl_model import VLConfig, VLForConditionalGeneration

    ids = {
        "image_token_id": processor.image_token_id,
        "video_token_id": processor.video_token_id,
        "vision_start_token_id": processor.vision_start_token_id,
        "vision_end_token_id": processor.vision_end_token_id,
    }
    config = VLConfig.from_qwen3_vl(hf_config_dict() | {"model_type": "qwen3_vl"} | ids)
    torch.manual_seed(seed)
    model = VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model.float().eval()


def supervised_text(tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """The decoded supervised tokens of one sample."""
    return str(tokenizer.decode(input_ids[labels != -100].tolist()))
