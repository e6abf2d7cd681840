"""For tests and examples only: a word-level demo tokenizer, tiny model configs and demo recipes.

Nothing in the libraries' training path depends on this module; it exists so that tests, the demo
(``examples/demo``) and the packaged demo recipes (``vl-train demo_s0`` ...) can build a model that
trains in seconds on a CPU without downloading anything.

- ``make_demo_tokenizer`` / ``make_demo_processor``: the synthetic dataset's words as tokens plus
  Qwen3-VL's special tokens (:mod:`vl_train.testing.tokenizer`); ``[model] tokenizer = "demo"`` in a recipe.
  ``word_level_tokenizer`` builds the same kind of tokenizer over another vocabulary (``PIECES`` and
  more words, say).
- ``TINY_TEXT`` / ``TINY_VISION``: ``VLTextConfig`` / ``VLVisionConfig`` fields of a model with about
  0.2 M parameters.
- ``recipes/``: ``demo_s0``, ``demo_s1``, ``demo_sft``, ``demo_distill`` (the synthetic demo chain).
"""

from __future__ import annotations

from typing import Any

from .tokenizer import PIECES, SPECIAL_TOKENS, WORDS, make_demo_processor, make_demo_tokenizer, word_level_tokenizer

__all__ = [
    "PIECES",
    "SPECIAL_TOKENS",
    "TINY_TEXT",
    "TINY_VISION",
    "WORDS",
    "make_demo_processor",
    "make_demo_tokenizer",
    "word_level_tokenizer",
]

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
}
"""Decoder fields of a tiny Qwen3-VL-style model (the vocabulary comes from the tokenizer)."""

TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 8,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0],
}
"""Vision tower fields of a tiny model (``out_hidden_size`` follows the decoder's width)."""
