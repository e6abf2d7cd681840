"""For tests and examples only: a tiny checkpoint folder in the official Qwen3-VL layout, as a Hub download has it.

Tests, tutorials and examples need an "official" checkpoint without downloading gigabytes;
:func:`make_official_checkpoint` writes one that has every file and id a real one has:

- ``config.json`` + ``model.safetensors`` written by transformers' own ``Qwen3VL(Moe)ForConditionalGeneration``
  (Qwen's vocabulary size, 151936, and its special-token ids: ``<|image_pad|>`` = 151655, ...);
- a tokenizer (``tokenizer.json`` / ``tokenizer_config.json``) whose regular vocabulary fills ids below
  151643 and whose special tokens sit at Qwen's real ids, with a ChatML chat template written for these
  tests in the style of Qwen3-VL-Instruct's: **no** ``{% generation %}`` markers, no thinking block;
- ``preprocessor_config.json`` / ``video_preprocessor_config.json`` with the fields and class names of the
  Hub files (budgets made small).

Only the layout is Qwen's; the weights are random and tiny.
"""

from __future__ import annotations

__all__ = [
    "INSTRUCT_TEMPLATE",
    "QWEN_SPECIAL",
    "VOCAB_SIZE",
    "make_official_checkpoint",
    "make_tokenizer",
    "official_config",
]

import json
import string
from pathlib import Path
from typing import Any

import torch

QWEN_SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<think>": 151667,
    "</think>": 151668,
}
"""Qwen3-VL's special tokens at their ids in the released tokenizers."""
VOCAB_SIZE = 151936

INSTRUCT_TEMPLATE = (
    "{%- set ns = namespace(images=0, videos=0) -%}"
    "{%- if messages[0].role != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' or 'image' in item -%}{%- set ns.images = ns.images + 1 -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{%- set ns.videos = ns.videos + 1 -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""A ChatML template shaped like Qwen3-VL-Instruct's (written for these tests): assistant turns carry no
generation markers."""

_WORD_TEXT = (
    "what how many is are the a an in this image picture photo video of there do you see describe colour color "
    "cat cats dog person astronaut coffee cup rocket grey gray brown black white red blue green yellow "
    "one two three four five six seven eight nine ten yes no it shows and with on at frame frames moving "
    "answer question short briefly please helpful assistant system user you are"
)
_WORDS = _WORD_TEXT.split()


def make_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with Qwen's special-token ids (words, characters, then filler up to 151643)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", " ", "\n", *string.ascii_letters, *string.digits, *string.punctuation, *_WORDS]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    for filler in range(len(vocab), QWEN_SPECIAL["<|endoftext|>"]):
        vocab[f"<|filler_{filler}|>"] = filler
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.NFC()
    words = sorted((w for w in _WORDS if len(w) > 1), key=len, reverse=True)
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?:" + "|".join(words) + ")(?![A-Za-z])|[\\s\\S]"), "isolated")
    core.decoder = decoders.Fuse()
    specials = sorted(QWEN_SPECIAL, key=QWEN_SPECIAL.get)  # type: ignore[arg-type]
    for token in specials:  # one at a time, so each lands at the next id: the gaps are filled below
        while core.get_vocab_size(with_added_tokens=True) < QWEN_SPECIAL[token]:
            core.add_special_tokens([AddedToken(f"<|reserved_{core.get_vocab_size(True)}|>", special=True)])
        core.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    tokenizer.chat_template = INSTRUCT_TEMPLATE
    for token, want in QWEN_SPECIAL.items():
        assert tokenizer.convert_tokens_to_ids(token) == want, token
    return tokenizer


def official_config(moe: bool = False) -> dict[str, Any]:
    """A tiny ``qwen3_vl`` (``qwen3_vl_moe``) config with Qwen's vocabulary and token ids, patch 16."""
    text: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 4096,
        "eos_token_id": QWEN_SPECIAL["<|im_end|>"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1]},
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 32,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0, 1],
    }
    return {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": QWEN_SPECIAL["<|image_pad|>"],
        "video_token_id": QWEN_SPECIAL["<|video_pad|>"],
        "vision_start_token_id": QWEN_SPECIAL["<|vision_start|>"],
        "vision_end_token_id": QWEN_SPECIAL["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def _preprocessor_files(folder: Path) -> None:
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {**common, "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}}
    image["image_processor_type"] = "Qwen2VLImageProcessorFast"
    video = {**common, "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}}
    video.update(video_processor_type="Qwen3VLVideoProcessor", fps=2, min_frames=2, max_frames=8, do_sample_frames=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": INSTRUCT_TEMPLATE}, indent=2))


def make_official_checkpoint(folder: Path, *, moe: bool = False, seed: int = 0) -> Path:
    """Write the tiny official-layout checkpoint (model, tokenizer, preprocessor files) into ``folder``."""
    import transformers

    torch.manual_seed(seed)
    data = official_config(moe)
    if moe:
        model: Any = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**data))
    else:
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**data))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    _preprocessor_files(folder)
    return folder
