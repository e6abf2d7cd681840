"""A tiny local tokenizer with Qwen3-VL's special tokens, for processor and model tests.

Built with the ``tokenizers`` library (word level over a small vocabulary, whitespace and
punctuation split, byte-free) so nothing is downloaded. Special tokens get ids right after the
word vocabulary, all below 400, and are ``special=True`` added tokens like Qwen's.
"""

from __future__ import annotations

import string

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
    "<|box_start|>",
    "<|box_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
"""Qwen3-VL's special and control tokens (``<think>`` pairs are plain added tokens in Qwen3)."""

_WORD_TEXT = (
    "user assistant system tool you are a helpful describe this image video picture what is in the "
    "and of to it for with hello hi yes no cat dog red blue seconds think nothink no_think answer "
    "question compare two images first second frame frames at time please short long okay sure "
    "Picture Video tools function name arguments"
)
_WORDS = _WORD_TEXT.split()


def _vocab() -> dict[str, int]:
    pieces = ["<unk>", "\n", " ", *(string.ascii_letters + string.digits + string.punctuation)]
    pieces += [w for w in _WORDS if w not in pieces]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` with Qwen3-VL's special tokens (ids < 400), built in memory.

    Words of the small vocabulary are single tokens; anything else falls back to characters, and
    unknown characters to ``<unk>``. Newlines and spaces are tokens, so decoding restores the text.
    """
    vocab = _vocab()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.NFC()
    # a known word (not followed by more letters) is one pre-token; anything else splits into characters
    words = sorted((w for w in vocab if len(w) > 1 and w != "<unk>"), key=len, reverse=True)
    pattern = "(?:" + "|".join(words) + ")(?![A-Za-z_])|[\\s\\S]"
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    return tok


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Id of one special token (raises if the tokenizer lacks it)."""
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int) or value == tokenizer.unk_token_id:
        raise KeyError(f"{token!r} is not in the tokenizer")
    return value
