"""A small word-level tokenizer for tests, examples and the demo recipes, built in memory (nothing is downloaded).

The demo recipes (``vl_train/recipes/demo_*.toml``) train a tiny model on the synthetic dataset
(:mod:`vl_train.data.synthetic`); a real tokenizer would need a download and a 150K-row embedding.
This one knows the synthetic dataset's words (prompts, answers, reasoning, the chat template's role
names) as single tokens, falls back to single characters for anything else (digits included, so
numbers and 0-1000 coordinates tokenise digit by digit), and carries Qwen3-VL's special tokens as
special added tokens, so :class:`vl_model.VLProcessor`'s chat template and placeholder expansion work
unchanged. Decoding restores the text exactly (spaces and newlines are tokens).

Notation: ``V`` = ``len(tokenizer)``, about 330.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PIECES", "SPECIAL_TOKENS", "WORDS", "make_demo_processor", "make_demo_tokenizer", "word_level_tokenizer"]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|box_start|>",
    "<|box_end|>",
    "<think>",
    "</think>",
)
"""Qwen3-VL's special and control tokens used by the chat template and the processor."""

_TEXT = """
user assistant system you are a an helpful the of and in is at to from with each for there
what which how many when does do answer one word number yes no or like first second image images
video frames frame shape shapes shapes circle circles square squares triangle triangles star stars
red green blue yellow purple orange colour colours describe list every its left right above below
of them this that so all count counting among none exactly pixels has have had more contains
compare comparing locate output bounding boxes box json format coordinates label spans centred
seconds second start starts moving moved still up visible appear appears during video has fps
draws draw drawn rows row erases erased left remain then now more look scan see I in all
Ada Ben Chen Dara Emil Fatima Goran Hana Ines Jon Answer Describe How Which When Locate Is What
The That So In Comparing Frame shows shape bbox_2d
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_TEXT.split()))
"""Whole-word tokens (the synthetic dataset's vocabulary)."""


PIECES: tuple[str, ...] = tuple(
    dict.fromkeys(["<unk>", "\n", " ", *(string.ascii_letters + string.digits + string.punctuation), "×", *WORDS])
)
"""The demo tokenizer's plain (non-special) tokens in id order: unknown, whitespace, characters, :data:`WORDS`."""


def word_level_tokenizer(vocab: Mapping[str, int], special_tokens: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` that reads every multi-character entry of ``vocab`` as one word.

    Text splits into the longest known word that does not run on into letters, else one character;
    a character outside ``vocab`` is ``<unk>``. Decoding restores the text exactly.

    Args:
        vocab: Token -> id; holds ``"<unk>"``. Special tokens listed here keep their ids.
        special_tokens: Added as special tokens (never split, skipped by ``skip_special_tokens``); those
            missing from ``vocab`` take the next free ids in order.

    Returns:
        The tokenizer; ``eos`` is ``<|im_end|>`` and ``pad`` is ``<|endoftext|>`` (as in Qwen3-VL).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token="<unk>"))
    core.normalizer = normalizers.NFC()
    specials = set(special_tokens)
    # longest words first so that "squares" wins over "square"; a word must not run on into letters
    words = sorted((w for w in vocab if len(w) > 1 and w != "<unk>" and w not in specials), key=len, reverse=True)
    pattern = "(?:" + "|".join(words) + ")(?![A-Za-z_])|[\\s\\S]"
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1 << 20,
    )


def make_demo_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with the synthetic dataset's words and Qwen3-VL's special tokens.

    Returns:
        The tokenizer: :data:`PIECES` at ids ``0..``, then :data:`SPECIAL_TOKENS`; ``eos`` is ``<|im_end|>``
        and ``pad`` is ``<|endoftext|>`` (as in Qwen3-VL).
    """
    return word_level_tokenizer({piece: i for i, piece in enumerate(PIECES)}, SPECIAL_TOKENS)


def make_demo_processor(
    *,
    patch_size: int = 8,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    fps: float = 2.0,
    max_frames: int = 8,
) -> Any:
    """A :class:`vl_model.VLProcessor` with the demo tokenizer and small image budgets.

    Args:
        patch_size: The tower's patch side (must match the model's ``vision_config.patch_size``).
        merge_size: The tower's spatial merge size.
        temporal_patch_size: Frames per temporal patch.
        min_pixels: Smallest image area after resizing (default: 4 merged tokens).
        max_pixels: Largest image area (default: 64 merged tokens, a 128x128 image at patch 8).
        fps: Video sampling rate.
        max_frames: Most frames kept per video.
    """
    from vl_model import VLProcessor
    from vl_vision.processing import ImageProcessor, VideoProcessor

    unit = (patch_size * merge_size) ** 2
    low = min_pixels if min_pixels is not None else 4 * unit
    high = max_pixels if max_pixels is not None else 64 * unit
    image = ImageProcessor(patch_size, temporal_patch_size, merge_size, min_pixels=low, max_pixels=high, num_threads=1)
    video = VideoProcessor(
        patch_size,
        temporal_patch_size,
        merge_size,
        min_pixels=low,
        max_pixels=high,
        fps=fps,
        min_frames=2,
        max_frames=max_frames,
        num_threads=1,
    )
    return VLProcessor(
        image,
        video,
        make_demo_tokenizer(),
    )
