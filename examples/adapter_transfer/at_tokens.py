"""Two tokenizers for the adapter-transfer example, and moving a language model from one to the other.

Skywork-R1V (REFERENCE.md section 4) trains the MLP adapter on an instruct LLM and then attaches it
to a reasoning LLM of the same width whose tokenizer may differ. Here both tokenizers are word-level
``tokenizers`` models built in memory by ``vl_train.testing.word_level_tokenizer``, as the demo's is:

- the **instruct** tokenizer: the synthetic dataset's words (``vl_train.testing.WORDS``), single
  characters, one token per scene cell content (:data:`CELL_WORDS`: ``"<c:red_circle>"``, ...,
  ``"<c:empty>"``), then Qwen3-VL's special tokens at the end (as the demo's);
- the **reasoning** tokenizer: the same pieces in a seeded random order, with the special tokens
  first and :data:`EXTRA_WORDS` added, so that every shared token, the image placeholder and the
  end-of-turn token included, has another id, and the vocabulary is larger.

:func:`token_map` pairs the ids of the tokens both tokenizers know; :func:`special_ids` reads the
placeholder and special-token ids a model config needs and raises ``KeyError`` naming any token a
tokenizer lacks; :func:`transfer_language_model` re-expresses a causal LM in another tokenizer
(embedding and output rows moved to the new ids, new tokens at the mean row), which is how a
"reasoning" LLM derived from an instruct one shares its hidden space but not its token ids.

Notation: ``V`` vocabulary size (rows of the embedding, a multiple of 64), ``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vl_train.data._shapes import COLOURS, KINDS
from vl_train.testing import PIECES, SPECIAL_TOKENS, word_level_tokenizer

__all__ = [
    "CELL_WORDS",
    "EMPTY_CELL",
    "EXTRA_WORDS",
    "MODEL_TOKENS",
    "cell_word",
    "make_processor",
    "make_tokenizer",
    "padded_vocab",
    "special_ids",
    "token_map",
    "transfer_language_model",
]

EMPTY_CELL = "<c:empty>"
"""Token of a scene cell without a shape."""

CELL_WORDS: tuple[str, ...] = (EMPTY_CELL, *(f"<c:{c}_{k}>" for c in COLOURS for k in KINDS))
"""One token per cell content: empty, or a colour and a kind (25 tokens)."""

EXTRA_WORDS: tuple[str, ...] = ("wait", "check", "again", "step", "therefore", "verify", "hmm", "because")
"""Words only the reasoning tokenizer has (it is a different tokenizer, not a renumbered one)."""

MODEL_TOKENS: dict[str, str] = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
}
"""Config field -> token: every id a composed model and its LM config hold (re-mapped on a swap)."""


def cell_word(colour: str | None, kind: str | None) -> str:
    """The token of one cell: ``"<c:empty>"`` for ``None`` colour/kind, else ``"<c:{colour}_{kind}>"``.

    Raises:
        ValueError: An unknown colour or kind, or only one of the two given.
    """
    if colour is None and kind is None:
        return EMPTY_CELL
    if colour not in COLOURS or kind not in KINDS:
        raise ValueError(
            f"unknown cell content colour={colour!r} kind={kind!r}; colours {list(COLOURS)}, kinds {KINDS}"
        )
    return f"<c:{colour}_{kind}>"


def _pieces() -> list[str]:
    """The plain (non-special) pieces both tokenizers share: unknown, whitespace, characters, words."""
    # the demo tokenizer's pieces and the words of the ``cells`` alignment task (at_cells)
    return list(dict.fromkeys([*PIECES, "List", "cell", "empty", "by"]))


def make_tokenizer(kind: str, *, seed: int = 0) -> Any:
    """The ``"instruct"`` or ``"reasoning"`` tokenizer (see the module docstring).

    Args:
        kind: ``"instruct"`` or ``"reasoning"``.
        seed: Seed of the reasoning tokenizer's vocabulary order.

    Returns:
        A ``PreTrainedTokenizerFast``; ``eos`` is ``<|im_end|>`` and ``pad`` ``<|endoftext|>`` in both.

    Raises:
        ValueError: An unknown ``kind``.
    """
    if kind not in ("instruct", "reasoning"):
        raise ValueError(f"tokenizer kind must be 'instruct' or 'reasoning', got {kind!r}")
    pieces, specials = _pieces(), [*SPECIAL_TOKENS, *CELL_WORDS]
    if kind == "reasoning":
        pieces = ["<unk>", *np.random.default_rng(seed).permutation([*pieces[1:], *EXTRA_WORDS]).tolist()]
        specials = np.random.default_rng(seed + 1).permutation(specials).tolist()
        # special tokens first: added tokens take the next free ids, so give them ids 0.. explicitly
        order = [*specials, *pieces]
    else:
        order = [*pieces, *specials]
    return word_level_tokenizer({piece: i for i, piece in enumerate(order)}, specials)


def padded_vocab(tokenizer: Any) -> int:
    """Embedding rows for ``tokenizer``: its length rounded up to a multiple of 64."""
    return -(-len(tokenizer) // 64) * 64


def make_processor(tokenizer: Any, *, patch_size: int, max_pixels: int) -> Any:
    """A :class:`vl_model.VLProcessor` with ``tokenizer`` and the example's image budget (no resizing below it)."""
    from vl_model import VLProcessor
    from vl_vision.processing import ImageProcessor, VideoProcessor

    unit = (patch_size * 2) ** 2
    image = ImageProcessor(patch_size, 2, 2, min_pixels=4 * unit, max_pixels=max_pixels, num_threads=1)
    video = VideoProcessor(patch_size, 2, 2, min_pixels=4 * unit, max_pixels=max_pixels, num_threads=1)
    return VLProcessor(image, video, tokenizer)


def _id(tokenizer: Any, token: str) -> int | None:
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int) or value == tokenizer.unk_token_id:
        return None
    return value


def special_ids(tokenizer: Any, tokens: dict[str, str] | None = None) -> dict[str, int]:
    """Config field -> id in ``tokenizer`` for :data:`MODEL_TOKENS` (or ``tokens``).

    Raises:
        KeyError: A token the tokenizer does not have (the field and the token named): its id cannot
            be re-mapped, and guessing one would feed the model the wrong embedding.
    """
    tokens = MODEL_TOKENS if tokens is None else tokens
    out: dict[str, int] = {}
    missing = []
    for field, token in tokens.items():
        value = _id(tokenizer, token)
        if value is None:
            missing.append(f"{field} ({token!r})")
        else:
            out[field] = value
    if missing:
        raise KeyError(f"the tokenizer has no token for {', '.join(missing)}: the ids cannot be re-mapped")
    return out


def token_map(source: Any, target: Any) -> dict[int, int]:
    """``{source id: target id}`` for every token both tokenizers have (``<unk>`` excluded)."""
    target_vocab = target.get_vocab()
    return {
        int(i): int(target_vocab[t])
        for t, i in source.get_vocab().items()
        if t in target_vocab and t != source.unk_token
    }


def _moved_rows(weight: torch.Tensor, rows: int, pairs: dict[int, int]) -> torch.Tensor:
    """``[rows, H]``: ``weight``'s row ``s`` at row ``t`` for every pair; the other rows get the mean row."""
    out = weight.detach().mean(0, keepdim=True).repeat(rows, 1)
    src = torch.tensor(sorted(pairs), dtype=torch.long)
    dst = torch.tensor([pairs[s] for s in sorted(pairs)], dtype=torch.long)
    out[dst] = weight.detach()[src]
    return out


def transfer_language_model(lm: Any, source: Any, target: Any, *, extra_ids: Sequence[str] = ()) -> Any:
    """A copy of causal LM ``lm`` re-expressed from tokenizer ``source`` to tokenizer ``target``.

    Every token both tokenizers have keeps its embedding and output rows at its new id; a token only
    ``target`` has starts at the mean row. The config's vocabulary size and special-token ids are set
    from ``target``.

    Args:
        lm: A transformers causal LM with untied input and output embeddings.
        source: ``lm``'s tokenizer.
        target: The new tokenizer.
        extra_ids: More ``config`` fields to take from ``target`` (``MODEL_TOKENS`` names).

    Raises:
        KeyError: ``target`` lacks one of the special tokens (see :func:`special_ids`).
        ValueError: Tied embeddings (rows would be moved twice).
    """
    from transformers import AutoModelForCausalLM

    if getattr(lm.config, "tie_word_embeddings", False):
        raise ValueError("transfer_language_model needs untied input and output embeddings")
    ids = special_ids(target, {k: MODEL_TOKENS[k] for k in ("eos_token_id", "pad_token_id", *extra_ids)})
    pairs = token_map(source, target)
    rows = padded_vocab(target)
    config = lm.config.__class__.from_dict({**lm.config.to_dict(), "vocab_size": rows, **ids, "bos_token_id": None})
    new = AutoModelForCausalLM.from_config(config)
    names = {id(p): name for name, p in lm.named_parameters()}
    state = dict(lm.state_dict())
    for table in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        state[names[id(table.weight)]] = _moved_rows(table.weight, rows, pairs)
    new.load_state_dict(state, strict=True)
    new.generation_config.eos_token_id = ids["eos_token_id"]
    new.generation_config.pad_token_id = ids["pad_token_id"]
    new.generation_config.bos_token_id = None
    return new
