"""Chat rendering of samples into model inputs with assistant-only labels, thinking and non-thinking formats.

Implements the SFT data format of Qwen3-VL (Qwen3-VL technical report, arXiv 2511.21631, section 4;
REFERENCE.md section 4) with Qwen3's thinking-mode fusion (Qwen3 technical report, arXiv
2505.09388, section 4.3): a sample is rendered with :class:`vl_model.VLProcessor`'s chat template,
its images and videos are preprocessed, and only the assistant's tokens are supervised:

- labels equal ``input_ids`` on assistant answer tokens, the closing ``<|im_end|>`` included, and
  ``-100`` everywhere else (the model shifts them inside);
- thinking format (the sample has ``"reasoning"``, or ``thinking=True``): the final answer is
  ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` and the reasoning block is supervised;
- non-thinking format: the template's empty ``<think>\\n\\n</think>\\n\\n`` block stays in the input
  (so the prompt matches inference with thinking off) but is not supervised.

Bad input: a missing or corrupt image fails with the sample's id and location (``policy="fail"``) or is
skipped and counted (``policy="skip"``); a sample longer than ``max_length`` is dropped or truncated
(``overlong``), and a truncation that would cut through an image's or video's placeholder tokens
drops the sample instead. Every such event is counted in :class:`~vl_train.data.format.DataStats`.

Huge text is dropped before it is tokenised (``overlong="drop"``): its non-whitespace characters after
the tokenizer's normaliser, over the longest vocabulary entry, bound its token count from below (a
10 MB field took 40-70 s to tokenise just to be dropped). The bound holds when every token spells one
vocabulary entry (byte-level BPE, SentencePiece with byte fallback: the Qwen3-VL family); a tokenizer
mapping a whole unknown word to one ``<unk>`` needs ``early_drop=False``. ``"truncate"`` tokenises all.

Notation: ``L`` tokens of one sample; ``N`` patches (rows of ``pixel_values``); grid ``(t, h, w)``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vl_model.processing import split_media

from .format import BadInputPolicy, DataError, DataStats, sample_location, validate_sample
from .messages import sample_messages

__all__ = ["EMPTY_THINK", "IGNORE_INDEX", "OverlongPolicy", "RenderedSample", "SampleRenderer"]

IGNORE_INDEX = -100
"""Label of unsupervised positions."""

EMPTY_THINK = "<think>\n\n</think>\n\n"
"""The template's empty reasoning block (non-thinking format)."""

OverlongPolicy = Literal["truncate", "drop"]
"""What to do with a sample longer than ``max_length``."""


@dataclass
class RenderedSample:
    """One rendered sample: token ids, labels and its visual inputs.

    Attributes:
        input_ids: ``[L]`` token ids with expanded ``<|image_pad|>`` / ``<|video_pad|>`` runs.
        labels: ``[L]`` ``input_ids`` on supervised positions, ``-100`` elsewhere.
        mm_token_type_ids: ``[L]`` 0 text, 1 image pad, 2 video pad.
        pixel_values: ``[N_img, C*T*P*P]`` or None.
        image_grid_thw: ``[n_images, 3]`` or None.
        pixel_values_videos: ``[N_vid, C*T*P*P]`` or None.
        video_grid_thw: ``[n_videos, 3]`` or None.
        sample_id: The sample's ``id``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    sample_id: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_labels(self) -> int:
        """Number of supervised tokens."""
        return int((self.labels != IGNORE_INDEX).sum())

    def as_batch(self) -> dict[str, torch.Tensor]:
        """Model inputs of this sample alone (batch of one, no padding)."""
        out = {
            "input_ids": self.input_ids[None],
            "labels": self.labels[None],
            "attention_mask": torch.ones_like(self.input_ids)[None],
            "mm_token_type_ids": self.mm_token_type_ids[None],
        }
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class _Templated:
    """A sample after the chat template, before tokenisation."""

    text: str
    char_spans: list[list[int]]
    images: list[Any]
    videos: list[Any]
    rates: list[Any]


def _visual_spans(types: torch.Tensor, grid: torch.Tensor | None, kind: int, merge: int) -> list[tuple[int, int]]:
    """``[first, last]`` token index of each image (``kind`` 1) or video (2), in order."""
    if grid is None:
        return []
    where = torch.nonzero(types == kind).flatten().tolist()
    spans, at = [], 0
    for count in (grid.prod(-1) // merge).tolist():
        spans.append((where[at], where[at + count - 1]))
        at += count
    return spans


class SampleRenderer:
    """Turns samples into :class:`RenderedSample` with the bad-input and overlong policies applied.

    Args:
        processor: A :class:`vl_model.VLProcessor` (tokenizer, media processors, chat template).
        max_length: Longest allowed sample in tokens (None: no limit).
        overlong: ``"drop"`` or ``"truncate"`` samples longer than ``max_length``.
        policy: ``"fail"`` raises :class:`DataError` on a missing/corrupt image or malformed sample;
            ``"skip"`` drops the sample and counts it.
        thinking: Force the thinking (True) or non-thinking (False) format; None picks thinking
            exactly when the sample has a non-empty ``"reasoning"``.
        stats: Where to count events (a new :class:`DataStats` when None).
        early_drop: With ``max_length`` and ``overlong="drop"``, drop a text whose character count
            alone proves it too long before tokenising it (see the module docstring).

    Raises:
        ValueError: Unknown ``overlong`` / ``policy`` values or ``max_length < 1``.
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None = None,
        overlong: OverlongPolicy = "drop",
        policy: BadInputPolicy = "fail",
        thinking: bool | None = None,
        stats: DataStats | None = None,
        early_drop: bool = True,
    ) -> None:
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        if policy not in ("fail", "skip"):
            raise ValueError(f"policy must be 'fail' or 'skip', got {policy!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.overlong = overlong
        self.policy = policy
        self.thinking = thinking
        self.stats = stats if stats is not None else DataStats()
        self.early_drop = early_drop
        self._longest_token: int | None = None

    # ------------------------------------------------------------------ public

    def __call__(self, sample: Any) -> RenderedSample | None:
        """Render one sample; None when it was skipped or dropped (and counted).

        Raises:
            DataError: With ``policy="fail"``: a malformed sample or a missing/corrupt image (the
                message names the sample id and its ``file:line``).
        """
        self.stats.add("seen")
        try:
            validate_sample(sample)
        except DataError as exc:
            self._bad("skipped_invalid", exc)
            return None
        try:
            text = self._template(sample)
            if self._surely_overlong(text.text, sample):
                return None
            out = self._encode(sample, text)
        except DataError as exc:
            self._bad("skipped_bad_media", exc)
            return None
        if out.num_labels == 0:  # e.g. a prompt without an answer: nothing to learn
            reason = "has no assistant token to learn from (an empty or missing assistant turn)"
            self._bad("dropped_no_labels", DataError(reason, sample_id=out.sample_id, location=sample_location(sample)))
            return None
        if self.max_length is not None and len(out) > self.max_length:
            return self._overlong(out, sample)
        self.stats.add("rendered")
        return out

    def iter(self, samples: Iterable[Any]) -> Iterator[RenderedSample]:
        """Render a stream of samples, leaving out the skipped and dropped ones."""
        for sample in samples:
            out = self(sample)
            if out is not None:
                yield out

    def render(self, sample: dict[str, Any]) -> RenderedSample:
        """Render a valid sample at full length (no policies applied).

        Raises:
            DataError: A missing or corrupt image or video, or media the processor rejects.
        """
        return self._encode(sample, self._template(sample))

    def _template(self, sample: dict[str, Any]) -> _Templated:
        """Media decoded and the chat template applied: everything before tokenisation."""
        messages, images, videos, rates = self._prepare(sample)
        think = self.thinking if self.thinking is not None else bool(sample.get("reasoning"))
        self._set_reasoning(messages, sample.get("reasoning"), think)
        try:
            text, char_spans = self.processor.render_conversation(messages)
        except ValueError as exc:  # a template whose assistant turns cannot be located in this sample
            raise DataError(str(exc), sample_id=sample.get("id"), location=sample_location(sample)) from exc
        if not think:  # the empty reasoning block is part of the prompt, not of what the model learns
            for span in char_spans:
                if text.startswith(EMPTY_THINK, span[0]):
                    span[0] += len(EMPTY_THINK)
        return _Templated(text, char_spans, images, videos, rates)

    def _encode(self, sample: dict[str, Any], templated: _Templated) -> RenderedSample:
        """Tokenise the templated text and preprocess its media."""
        videos = templated.videos
        try:
            enc = self.processor(
                text=[templated.text],
                images=templated.images or None,
                videos=videos or None,
                video_fps=templated.rates if videos else None,
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
                add_special_tokens=False,
            )
        except (OSError, ValueError) as exc:
            raise DataError(
                f"media could not be processed: {exc}", sample_id=sample.get("id"), location=sample_location(sample)
            ) from exc
        ids = torch.tensor(enc["input_ids"][0], dtype=torch.long)
        mask = self._assistant_mask(templated.char_spans, enc["offset_mapping"][0], enc["text_replacement_offsets"][0])
        out = RenderedSample(
            input_ids=ids,
            labels=torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX)),
            mm_token_type_ids=torch.tensor(enc["mm_token_type_ids"][0], dtype=torch.long),
            sample_id=str(sample["id"]),
        )
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if key in enc:
                setattr(out, key, torch.as_tensor(enc[key]))
        return out

    # ------------------------------------------------------------------ steps

    def _surely_overlong(self, text: str, sample: dict[str, Any]) -> bool:
        """Drop (and count) a text whose character count proves it longer than ``max_length``."""
        if self.max_length is None or self.overlong != "drop" or not self.early_drop:
            return False
        if len(text) <= self.max_length:  # the bound below never exceeds the character count
            return False
        backend = getattr(self.processor.tokenizer, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        lower = math.ceil(len("".join(text.split())) / self._longest_token_chars())
        if lower <= self.max_length:
            return False
        where = f"sample {sample.get('id')!r} ({sample_location(sample) or 'no location'})"
        self.stats.add(
            "dropped_overlong",
            f"{where}: at least {lower} tokens ({len(text)} characters) > max_length {self.max_length}, "
            "dropped before tokenising",
        )
        return True

    def _longest_token_chars(self) -> int:
        if self._longest_token is None:
            vocab = self.processor.tokenizer.get_vocab()
            self._longest_token = max([len(token) for token in vocab] + [1])
        return self._longest_token

    def _bad(self, event: str, exc: DataError) -> None:
        if self.policy == "fail":
            raise exc
        self.stats.add(event, str(exc))

    def _prepare(self, sample: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any], list[Any], list[Any]]:
        """Template messages (media replaced by bare items) and the decoded media in order."""
        return split_media(sample_messages(sample))

    @staticmethod
    def _set_reasoning(messages: list[dict[str, Any]], reasoning: Any, think: bool) -> None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        final = messages[last]
        if think:
            if reasoning:
                final["reasoning_content"] = str(reasoning)
            return
        # non-thinking format: no reasoning may reach the final answer
        final.pop("reasoning_content", None)
        if isinstance(final["content"], str) and "</think>" in final["content"]:
            final["content"] = final["content"].split("</think>")[-1].lstrip("\n")

    @staticmethod
    def _assistant_mask(
        spans: list[list[int]], offsets: list[tuple[int, int]], replaced: list[dict[str, Any]]
    ) -> torch.Tensor:
        """``[L]`` True on tokens overlapping an assistant span of the unexpanded text."""
        # the processor expanded placeholders after rendering: shift span ends past earlier expansions
        ends = [r["span"][1] for r in replaced]
        gained = [0]
        for r in replaced:
            gained.append(r["new_span"][1] - r["span"][1])
        mask = torch.zeros(len(offsets), dtype=torch.bool)
        starts = torch.tensor([o[0] for o in offsets])
        stops = torch.tensor([o[1] for o in offsets])
        for begin, end in spans:
            lo = begin + gained[bisect_right(ends, begin)]
            hi = end + gained[bisect_right(ends, end)]
            mask |= (starts < hi) & (stops > lo)
        return mask

    def _overlong(self, out: RenderedSample, sample: dict[str, Any]) -> RenderedSample | None:
        assert self.max_length is not None
        where = f"sample {out.sample_id!r} ({sample_location(sample) or 'no location'})"
        detail = f"{where}: {len(out)} tokens > max_length {self.max_length}"
        if self.overlong == "drop":
            self.stats.add("dropped_overlong", detail)
            return None
        cut = self.max_length
        types = out.mm_token_type_ids
        kept: dict[str, int] = {}
        for kind, grid, name in ((1, out.image_grid_thw, "image"), (2, out.video_grid_thw, "video")):
            merge = self._merge(name) ** 2
            spans = _visual_spans(types, grid, kind, merge)
            if any(first < cut <= last for first, last in spans):
                self.stats.add("dropped_cut_media", f"{detail}: the cut at {cut} falls inside a {name}")
                return None
            kept[name] = sum(1 for first, _ in spans if first < cut)
        labels = out.labels[:cut]
        if not bool((labels != IGNORE_INDEX).any()):
            self.stats.add("dropped_no_labels", f"{detail}: no supervised token before the cut")
            return None
        result = RenderedSample(
            input_ids=out.input_ids[:cut],
            labels=labels,
            mm_token_type_ids=types[:cut],
            sample_id=out.sample_id,
        )
        for name, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            grid = getattr(out, grid_key)
            if grid is None or kept[name] == 0:
                continue
            rows = int(grid[: kept[name]].prod(-1).sum())
            setattr(result, grid_key, grid[: kept[name]])
            setattr(result, pixels_key, getattr(out, pixels_key)[:rows])
        self.stats.add("truncated", f"{detail}: truncated to {cut}")
        self.stats.add("rendered")
        return result

    def _merge(self, name: str) -> int:
        proc = self.processor.image_processor if name == "image" else self.processor.video_processor
        return int(proc.merge_size)
