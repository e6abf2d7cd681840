"""The example's parts: a pretrained vision tower and two language models of the same width.

Skywork-R1V starts from three pretrained checkpoints: a vision tower, an instruct LLM and a reasoning
LLM derived from it. Here each is made in seconds on a CPU, from the suite's parts:

- **tower**: our ``VisionTransformer`` (the demo's tower sizes), pretrained like the demo's V0
  (``examples/demo/demo_vision.pretrain_tower``: each merged token names its cell's kind and colour
  through linear heads that are then dropped), standing in for a pretrained SigLIP-2. Its merger
  from V0 is thrown away: the adapter (merger and DeepStack mergers) starts fresh, as in Skywork-R1V.
- **instruct LLM**: a transformers Qwen3 causal LM pretrained on the text view of the synthetic tasks
  (``at_cells``: one token per cell), so it already counts and names colours from cell tokens.
- **reasoning LLM**: the instruct LLM re-expressed in the reasoning tokenizer
  (``at_tokens.transfer_language_model``: rows moved to the new ids) and fine-tuned on the text view
  with reasoning traces (``<think>...</think>``) on part of the samples: another tokenizer, the same
  hidden space, which is why an adapter trained on one transfers to the other.

:func:`fresh_adapter` re-initialises a tower's merger and DeepStack mergers (what the baseline and
stage A start from); :func:`fingerprint` / :func:`changed_parameters` check that frozen parts stay
bit-identical.

Notation: ``H`` the LLM width (= the merger's output width).
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))

from at_tokens import CELL_WORDS, EMPTY_CELL, MODEL_TOKENS, padded_vocab, special_ids
from demo_vision import TowerSpec, pretrain_tower

from vl_vision import VisionConfig, VisionTransformer

__all__ = [
    "CellNoise",
    "ModelSpec",
    "changed_parameters",
    "compose_cell_embeddings",
    "fingerprint",
    "fresh_adapter",
    "new_language_model",
    "new_tower",
    "pretrain_vision_tower",
    "swap_checked",
    "vision_ids",
]

VISION_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
"""The composed model's placeholder ids (``vl_model.compose`` keywords)."""


@dataclass
class ModelSpec:
    """Sizes of the parts and of the synthetic scenes.

    Attributes:
        text: Qwen3 config fields of both LLMs (vocabulary and special ids come from the tokenizer).
        vision: ``VisionConfig`` fields of the tower (``out_hidden_size`` follows the LLM width).
        image_size_range: Smallest and largest image side of the scenes.
        grid: Cell side of the scenes: ``patch_size * 2``, one shape per merged visual token.
        max_pixels: Image budget of the processors (no image is resized below it).
        tower: V0, the tower pretrained alone (``demo_vision.TowerSpec``).
    """

    text: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 2048,
        }
    )
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        }
    )
    image_size_range: tuple[int, int] = (96, 128)
    grid: int = 32
    max_pixels: int = 128 * 128
    tower: TowerSpec = field(default_factory=TowerSpec)

    @property
    def width(self) -> int:
        """``H``: the LLMs' hidden size."""
        return int(self.text["hidden_size"])


def smoke_model(**overrides: Any) -> ModelSpec:
    """Tiny parts for smoke runs and tests: the plumbing in seconds (the numbers mean nothing)."""
    return ModelSpec(
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 512,
        },
        vision={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_size_range=(48, 64),
        grid=16,
        max_pixels=64 * 64,
        **overrides,
    )


def new_language_model(spec: ModelSpec, tokenizer: Any, seed: int) -> Any:
    """A fresh Qwen3 causal LM for ``tokenizer`` (untied embeddings, the tokenizer's eos and pad ids)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    ids: dict[str, Any] = special_ids(tokenizer, {"eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"})
    config = Qwen3Config(
        vocab_size=padded_vocab(tokenizer), tie_word_embeddings=False, bos_token_id=None, **ids, **spec.text
    )
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config)
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = ids["eos_token_id"], ids["pad_token_id"]
    lm.generation_config.bos_token_id = None
    return lm


def compose_cell_embeddings(lm: Any, tokenizer: Any) -> None:
    """Start every cell token's input embedding at the sum of its colour's and its kind's word rows.

    A cell token is one opaque id; an LLM learns what it shares with the words "red" and "star" only
    from data. Real LLMs' word embeddings are related from pretraining; here the relation is given at
    initialisation, which makes the text pretraining several times shorter (README, what was tried).
    """
    table = lm.get_input_embeddings().weight
    with torch.no_grad():
        for word in CELL_WORDS:
            if word == EMPTY_CELL:
                continue
            colour, kind = word[3:-1].split("_")
            parts = [tokenizer.convert_tokens_to_ids(w) for w in (colour, kind)]
            table[tokenizer.convert_tokens_to_ids(word)] = table[parts[0]] + table[parts[1]]


class CellNoise:
    """While active, adds Gaussian noise to the input embeddings of the cell tokens (training mode only).

    An LLM trained only on exact token embeddings reads nothing else: adapter outputs a little off
    the cell rows (an error of 16 % of a row's norm) cost it half its counting accuracy (README, what
    was tried). Real LLMs come with smoother inputs from pretraining; here the text pretraining sees
    each cell row plus noise of ``relative`` times the cell rows' RMS per dimension.

    Args:
        lm: The causal LM (its input embedding module gets a forward hook).
        tokenizer: Its tokenizer (holds :data:`at_tokens.CELL_WORDS`).
        relative: Noise standard deviation over the RMS of the cell rows (0: no noise).
        seed: Seed of the noise.
    """

    def __init__(self, lm: Any, tokenizer: Any, relative: float, *, seed: int = 0) -> None:
        self.table = lm.get_input_embeddings()
        self.cells = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in CELL_WORDS])
        self.relative = relative
        self.generator = torch.Generator().manual_seed(seed)
        self.handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or self.relative <= 0 or not args:
            return None
        mask = torch.isin(args[0], self.cells.to(args[0].device))
        if not bool(mask.any()):
            return None
        scale = self.relative * float(self.table.weight.detach()[self.cells].pow(2).mean().sqrt())
        noise = torch.randn(output.shape, generator=self.generator).to(output) * scale
        return output + noise * mask[..., None]

    def __enter__(self) -> CellNoise:
        self.handle = self.table.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def new_tower(spec: ModelSpec, seed: int) -> VisionTransformer:
    """A fresh tower whose merger outputs the LLM width."""
    torch.manual_seed(seed)
    fields = {"spatial_merge_size": 2, "temporal_patch_size": 2, **spec.vision, "out_hidden_size": spec.width}
    return VisionTransformer(VisionConfig(**fields))


def pretrain_vision_tower(
    tower: VisionTransformer, processor: Any, spec: ModelSpec, output_dir: Path, *, seed: int, progress: bool
) -> tuple[float, list[float]]:
    """V0 on ``tower`` in place (``demo_vision.pretrain_tower``); returns ``(seconds, loss per step)``."""
    # pretrain_tower reads the tower and the merger width the way the core model holds them
    host = types.SimpleNamespace(
        model=types.SimpleNamespace(visual=tower),
        config=types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=spec.width)),
    )
    settings = types.SimpleNamespace(image_size_range=spec.image_size_range, grid=spec.grid, seed=seed)
    return pretrain_tower(host, processor, settings, spec.tower, output_dir, progress=progress)


def fresh_adapter(tower: VisionTransformer, seed: int) -> VisionTransformer:
    """Re-initialise the merger and DeepStack mergers of ``tower`` in place (the tower's blocks stay).

    Linear layers get ``N(0, initializer_range)`` weights and zero biases (as ``vl_model.compose`` gives
    a new merger), norms their unit init.
    """
    generator = torch.Generator().manual_seed(seed)
    std = tower.config.initializer_range
    with torch.no_grad():
        for module in (tower.merger, tower.deepstack_merger_list):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
                    if sub.bias is not None:
                        sub.bias.zero_()
                elif isinstance(sub, nn.LayerNorm):
                    sub.reset_parameters()
    return tower


def vision_ids(tokenizer: Any) -> dict[str, Any]:
    """The four placeholder ids ``vl_model.compose`` takes, read from ``tokenizer`` (``KeyError`` if one is missing)."""
    return special_ids(tokenizer, {k: MODEL_TOKENS[k] for k in VISION_FIELDS})


def swap_checked(model: Any, new_lm: Any, processor: Any) -> dict[str, tuple[int, int]]:
    """Swap ``new_lm`` into composed ``model``, re-mapping every token id to ``processor``'s tokenizer.

    The placeholder and special-token ids are read from the new tokenizer by name (never carried
    over), passed to ``vl_model.swap_language_model`` (the generation config takes ``new_lm``'s), and checked
    against the processor (``vl_train.builders.check_processor``: ids, vocabulary, patch sizes).

    Returns:
        Field -> ``(old id, new id)`` for every re-mapped id.

    Raises:
        KeyError: The new tokenizer lacks one of the tokens (see ``at_tokens.special_ids``).
        ValueError: ``new_lm``'s own eos / pad ids are not its tokenizer's, or a check failed.
    """
    from vl_model import swap_language_model
    from vl_train.builders import check_processor

    new = special_ids(processor.tokenizer)
    generation = model.generation_config
    old = {f: int(getattr(model.config, f)) for f in VISION_FIELDS}
    old.update(eos_token_id=int(generation.eos_token_id), pad_token_id=int(generation.pad_token_id))
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(new_lm.config, name) != new[name]:
            raise ValueError(
                f"the new language model's {name} is {getattr(new_lm.config, name)} but its tokenizer's "
                f"{MODEL_TOKENS[name]} is id {new[name]}"
            )
    swap_language_model(model, new_lm, **{f: new[f] for f in VISION_FIELDS})  # eos / pad follow new_lm's
    check_processor(model, processor)
    now = {f: int(getattr(model.config, f)) for f in VISION_FIELDS}
    now.update(eos_token_id=int(generation.eos_token_id), pad_token_id=int(generation.pad_token_id))
    wrong = {f: v for f, v in now.items() if v != new[f]}
    if wrong:
        raise ValueError(f"ids {wrong} were not re-mapped to the new tokenizer's {new}")
    return {f: (old[f], new[f]) for f in new}


def fingerprint(model: nn.Module, parts: Sequence[str]) -> dict[str, str]:
    """Parameter name -> hash of its bytes, for the parameters of ``parts`` (``vl_model.PARTS`` names).

    A cheap record to check later, bit for bit, that frozen parts did not change.
    """
    from vl_model.parts import part_parameters

    ids = {id(p) for part in parts for p in part_parameters(model, part)}
    return {
        name: hashlib.blake2b(
            p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16
        ).hexdigest()
        for name, p in model.named_parameters()
        if id(p) in ids
    }


def changed_parameters(before: Mapping[str, str], model: nn.Module, parts: Sequence[str]) -> list[str]:
    """Names of the parameters of ``parts`` whose bytes differ from ``before`` (new and missing ones too)."""
    after = fingerprint(model, parts)
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
