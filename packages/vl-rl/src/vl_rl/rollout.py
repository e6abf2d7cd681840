"""Rollouts: batched multimodal generation of ``G`` responses per prompt, with forced answers on truncation.

Implements the rollout side of Qwen3-VL's reasoning RL (REFERENCE.md section 5) and GLM-4.5V's
truncation handling: prompts are encoded by the processor (``vl_train.data.messages.prompt_inputs``:
chat template, thinking on, off, or per sample), left-padded into one batch (``VLProcessor.pad_prompts``),
repeated ``G`` times and sampled with Hugging Face ``generate`` (KV cache on; the vision encoder runs
once per generate call, in the prefill). Under ``torch.distributed`` every rank samples its own
prompts with ``synced_gpus`` (a sharded model's forwards are collectives) and the ranks agree on how
many forced-answer calls they make. When a response hits
``max_new_tokens`` inside an open ``<think>`` block and ``force_answer`` is on, ``</think>`` and a short
cue are appended (masked out of the loss) and up to ``answer_tokens`` more tokens are generated.

:func:`rollout_logprobs` scores the sampled tokens under a model (old policy, reference or the policy
being trained), with the sampling temperature (``vl_train.logprobs.completion_logprobs``).

Notation: ``N`` prompts, ``G`` responses per prompt, ``R = N * G`` rows, ``P`` prompt length (left
padding), ``T`` completion length (right padding), ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn

from ._dist import agreed, distributed

__all__ = [
    "DEFAULT_ANSWER_CUE",
    "HFRolloutEngine",
    "Rollout",
    "RolloutEngine",
    "concat_rollouts",
    "decode_response",
    "encode_prompt",
    "prompt_text",
    "rollout_logprobs",
    "select_rows",
    "subset_groups",
]

DEFAULT_ANSWER_CUE = "\n</think>\n\n"
"""Appended to a truncated thinking response: closes the block in the chat template's own format."""
_VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Rollout:
    """``G`` responses to each of ``N`` prompts, ready for scoring and a policy update.

    Attributes:
        samples: The ``N`` prompts' samples; row ``i`` answers ``samples[i // group_size]``.
        group_size: ``G``.
        sequences: ``[R, P + T]`` left-padded prompt followed by the (right-padded) completion.
        prompt_length: ``P``.
        completion_mask: ``[R, T]`` True on tokens the policy produced (trained on); False on padding,
            forced-answer cues and tool outputs.
        texts: ``R`` decoded responses (end-of-turn and padding tokens removed, think tags kept).
        truncated: ``[R]`` True where the response hit ``max_new_tokens`` (before any forced answer).
        model_inputs: What a forward over ``sequences`` needs besides the ids (``attention_mask``
            ``[R, P + T]``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ...).
        images_per_row: Images of each row, in the order of ``image_grid_thw``.
        videos_per_row: Videos of each row, in the order of ``video_grid_thw``.
        tool_calls: Tool calls made per row (tool-integrated rollouts; zeros otherwise).
    """

    samples: list[dict[str, Any]]
    group_size: int
    sequences: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    model_inputs: dict[str, torch.Tensor]
    images_per_row: list[int] = field(default_factory=list)
    videos_per_row: list[int] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)

    @property
    def row_samples(self) -> list[dict[str, Any]]:
        """The sample of every row (``R`` entries)."""
        return [s for s in self.samples for _ in range(self.group_size)]


class RolloutEngine(Protocol):
    """Anything that samples ``group_size`` responses per sample (HF generate, vLLM, tools, fakes)."""

    def generate(self, samples: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        """Sample (or, with ``greedy``, decode greedily) ``group_size`` responses to each sample."""
        ...


def prompt_text(processor: Any, sample: Mapping[str, Any], thinking: bool | None = None) -> tuple[str, list[Any]]:
    """The rendered prompt (every turn before the final assistant turn + generation prompt) and its images.

    Args:
        processor: A :class:`vl_model.VLProcessor` (its chat template and tokenizer).
        sample: A suite sample (``messages`` with image / text items).
        thinking: True opens a thinking response, False adds the empty think block, None: on when the
            sample has a ``reasoning`` field.

    Raises:
        ValueError: The sample has no user turn, or holds a video (this returns images only; use
            :func:`encode_prompt`, which takes videos too).
    """
    from vl_train.data.messages import sample_messages, wants_thinking

    messages = sample_messages(sample, prompt_only=True)
    text, images, videos, _ = processor.render_prompt(messages, thinking=wants_thinking(sample, thinking))
    if videos:
        raise ValueError(
            f"sample {sample.get('id')!r} holds a video: prompt_text returns text and images only "
            "(encode_prompt, used by the HF and tool engines, takes videos)"
        )
    return text, images


def encode_prompt(processor: Any, sample: Mapping[str, Any], thinking: bool | None = None) -> dict[str, torch.Tensor]:
    """Model inputs of one sample's prompt (``vl_train.data.messages.prompt_inputs``; needs ``vl-rl[train]``)."""
    from vl_train.data.messages import prompt_inputs

    return prompt_inputs(processor, sample, thinking)


def _extend_prompt(
    prompt: Mapping[str, torch.Tensor], tail: Sequence[int], image_token_id: int
) -> dict[str, torch.Tensor]:
    """``prompt``'s inputs with tokens ``tail`` appended; image placeholders in ``tail`` get token type 1.

    The pixels stay the prompt's: a caller whose ``tail`` holds new image turns adds their pixels.
    """
    row = dict(prompt)
    body = torch.tensor(list(tail), dtype=torch.long)
    row["input_ids"] = torch.cat([prompt["input_ids"].reshape(-1), body])
    types = prompt.get("mm_token_type_ids")
    base = types.reshape(-1) if types is not None else prompt["input_ids"].reshape(-1) * 0
    row["mm_token_type_ids"] = torch.cat([base, (body == image_token_id).long()])
    return row


def decode_response(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of completion tokens with end-of-turn and padding tokens removed (think and tool tags kept)."""
    text = str(tokenizer.decode(list(ids), skip_special_tokens=False))
    for special in {tokenizer.pad_token, tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|image_pad|>"}:
        if special:
            text = text.replace(special, "")
    return text


def _rows_of(counts: Sequence[int], grids: torch.Tensor | None, rows: Sequence[int]) -> tuple[list[int], list[int]]:
    """Indices into the grid list and the patch rows of the images of ``rows``."""
    if grids is None or not counts:
        return [], []
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    patches = grids.prod(-1).tolist()
    offsets = [0]
    for p in patches:
        offsets.append(offsets[-1] + int(p))
    items = [i for r in rows for i in range(starts[r], starts[r + 1])]
    patch_rows = [k for i in items for k in range(offsets[i], offsets[i + 1])]
    return items, patch_rows


def select_rows(rollout: Rollout, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(sequences, completion_mask, model_inputs)`` of a subset of rows (visual inputs sliced to match)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    inputs: dict[str, torch.Tensor] = {}
    for key, value in rollout.model_inputs.items():
        if key not in _VISUAL_KEYS:
            inputs[key] = value[index]
    for kind, counts in (("", rollout.images_per_row), ("_videos", rollout.videos_per_row)):
        grid_key = "image_grid_thw" if not kind else "video_grid_thw"
        grids = rollout.model_inputs.get(grid_key)
        items, patch_rows = _rows_of(counts, grids, rows)
        if grids is not None and items:
            inputs[grid_key] = grids[torch.as_tensor(items)]
            inputs[f"pixel_values{kind}"] = rollout.model_inputs[f"pixel_values{kind}"][torch.as_tensor(patch_rows)]
    return rollout.sequences[index], rollout.completion_mask[index], inputs


def subset_groups(rollout: Rollout, groups: Sequence[int]) -> Rollout:
    """The rollout of the chosen prompts only (``groups`` index ``rollout.samples``)."""
    g = rollout.group_size
    rows = [k * g + j for k in groups for j in range(g)]
    sequences, mask, inputs = select_rows(rollout, rows)
    pick = torch.as_tensor(rows, dtype=torch.long)
    return Rollout(
        samples=[rollout.samples[k] for k in groups],
        group_size=g,
        sequences=sequences,
        prompt_length=rollout.prompt_length,
        completion_mask=mask,
        texts=[rollout.texts[r] for r in rows],
        truncated=rollout.truncated[pick],
        model_inputs=inputs,
        images_per_row=[rollout.images_per_row[r] for r in rows] if rollout.images_per_row else [],
        videos_per_row=[rollout.videos_per_row[r] for r in rows] if rollout.videos_per_row else [],
        tool_calls=[rollout.tool_calls[r] for r in rows] if rollout.tool_calls else [],
    )


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of several (same ``group_size``): prompts re-left-padded, completions re-right-padded.

    Raises:
        ValueError: No parts, or different group sizes.
    """
    if not parts or len({p.group_size for p in parts}) != 1:
        raise ValueError(f"need rollouts of one group size, got {[p.group_size for p in parts]}")
    if len(parts) == 1:
        return parts[0]
    length = max(p.prompt_length for p in parts)
    steps = max(p.completion_mask.shape[1] for p in parts)

    def pad(x: torch.Tensor, p: Rollout, value: int) -> torch.Tensor:
        left, right = length - p.prompt_length, steps - p.completion_mask.shape[1]
        return torch.nn.functional.pad(x, (left, right), value=value)

    inputs: dict[str, torch.Tensor] = {}
    for key in parts[0].model_inputs:
        if key in _VISUAL_KEYS:
            inputs[key] = torch.cat([p.model_inputs[key] for p in parts if key in p.model_inputs])
        else:
            inputs[key] = torch.cat([pad(p.model_inputs[key], p, 0) for p in parts])
    right = [torch.nn.functional.pad(p.completion_mask, (0, steps - p.completion_mask.shape[1])) for p in parts]
    return Rollout(
        samples=[s for p in parts for s in p.samples],
        group_size=parts[0].group_size,
        sequences=torch.cat([pad(p.sequences, p, pad_token_id) for p in parts]),
        prompt_length=length,
        completion_mask=torch.cat(right),
        texts=[t for p in parts for t in p.texts],
        truncated=torch.cat([p.truncated for p in parts]),
        model_inputs=inputs,
        images_per_row=[c for p in parts for c in p.images_per_row],
        videos_per_row=[c for p in parts for c in p.videos_per_row],
        tool_calls=[c for p in parts for c in p.tool_calls],
    )


def rollout_logprobs(
    model: nn.Module,
    sequences: torch.Tensor,
    model_inputs: Mapping[str, torch.Tensor],
    prompt_length: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[R, T]`` log-probabilities of the completion tokens (and their entropies) under ``model``.

    ``vl_train.logprobs.completion_logprobs`` (needs ``vl-rl[train]``): the logits are divided by
    ``temperature`` (the sampling temperature), so the ratio to the rollout policy is 1 for an unchanged
    model; gradients flow unless called under ``torch.no_grad``; the ``[R * T, V]`` logits exist
    ``chunk_size`` positions at a time and are recomputed in backward.
    """
    from vl_train.logprobs import completion_logprobs

    return completion_logprobs(
        model,
        sequences,
        model_inputs,
        prompt_length,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


class HFRolloutEngine:
    """Batched Hugging Face ``generate`` with our model: left-padded multimodal prompts, ``G`` copies each.

    Args:
        model: A :class:`vl_model.TrainableVLM` that can ``generate`` (core or composed model).
        processor: Its processor (chat template, tokenizer, image processor).
        max_new_tokens: Tokens per response before truncation.
        temperature: Sampling temperature (ignored when greedy).
        top_p: Nucleus threshold (ignored when greedy).
        thinking: Thinking prompt on (True), off (False) or per sample (None).
        force_answer: Force an answer after a response truncated inside ``<think>``.
        answer_tokens: Most tokens of a forced answer.
        batch_size: Rows per ``generate`` call (the vision encoder runs once per call).
        answer_cue: Text appended to a truncated thinking response (masked out of the loss).

    Raises:
        ValueError: Non-positive token budgets, batch size or temperature.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        thinking: bool | None = None,
        force_answer: bool = True,
        answer_tokens: int = 16,
        batch_size: int = 64,
        answer_cue: str = DEFAULT_ANSWER_CUE,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1 or answer_tokens < 0:
            raise ValueError(
                f"need max_new_tokens >= 1, batch_size >= 1, answer_tokens >= 0; "
                f"got {max_new_tokens}, {batch_size}, {answer_tokens}"
            )
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.thinking, self.force_answer, self.answer_tokens = thinking, force_answer, answer_tokens
        self.batch_size, self.answer_cue = batch_size, answer_cue
        tok = processor.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        eos = {int(tok.eos_token_id)}
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update([config_eos] if isinstance(config_eos, int) else list(config_eos or []))
        self.eos_ids = sorted(eos)
        self.image_token_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
        # a sampled placeholder would need pixels the forward does not have: never sample one
        vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        self.suppress_ids = sorted({int(tok.convert_tokens_to_ids(t)) for t in vision} - {tok.unk_token_id})

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    def _generate(self, batch: Mapping[str, torch.Tensor], max_new_tokens: int, greedy: bool) -> torch.Tensor:
        """``[B, L + t]`` sequences; sampling settings from the engine, KV cache on."""
        options: dict[str, Any] = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(  # type: ignore[operator]
                    **{k: v.to(self.device) for k, v in batch.items()},
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos_ids,
                    pad_token_id=self.pad_id,
                    use_cache=True,
                    suppress_tokens=self.suppress_ids or None,
                    synced_gpus=distributed(),  # a sharded model: every rank runs every forward
                    **options,
                )
        finally:
            self.model.train(was_training)
        return cast(torch.Tensor, out).cpu()

    def _cut(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """Tokens up to and including the first EOS, and whether there was none (truncated)."""
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                return list(ids[: k + 1]), False
        return list(ids), True

    def _think_open(self, ids: Sequence[int]) -> bool:
        text = str(self.processor.tokenizer.decode(list(ids), skip_special_tokens=False))
        return text.rfind("<think>") > text.rfind("</think>")

    def generate(self, samples: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        """``group_size`` responses to each sample (see the module docstring).

        Raises:
            ValueError: No samples or ``group_size < 1``.
        """
        if not samples or group_size < 1:
            raise ValueError(f"need at least one sample and group_size >= 1, got {len(samples)} and {group_size}")
        encoded = [encode_prompt(self.processor, s, self.thinking) for s in samples]
        rows = [e for e in encoded for _ in range(group_size)]
        length = max(int(e["input_ids"].shape[-1]) for e in rows)
        completions: list[list[int]] = []
        trained: list[list[bool]] = []
        truncated: list[bool] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            out = self._generate(self.processor.pad_prompts(chunk, length=length), self.max_new_tokens, greedy)
            for ids in out[:, length:].tolist():
                kept, cut = self._cut(ids)
                completions.append(kept)
                trained.append([True] * len(kept))
                truncated.append(cut)
        if self.force_answer and self.answer_tokens > 0:
            context = lambda i, tail: _extend_prompt(rows[i], tail, self.image_token_id)
            self._force_answers(context, completions, trained, truncated, greedy)
        return self.assemble(list(samples), group_size, rows, completions, trained, truncated)

    def _force_answers(
        self,
        context: Callable[[int, list[int]], dict[str, torch.Tensor]],
        completions: list[list[int]],
        trained: list[list[bool]],
        truncated: list[bool],
        greedy: bool,
    ) -> None:
        """Close the open ``<think>`` of truncated rows and let them answer (in place).

        ``context(i, tail)`` is row ``i``'s model inputs (prompt and any tool turns) ending in ``tail``.
        """
        todo = [i for i, cut in enumerate(truncated) if cut and self._think_open(completions[i])]
        calls = agreed(-(-len(todo) // self.batch_size))  # every rank makes as many generate calls
        cue = list(self.processor.tokenizer.encode(self.answer_cue, add_special_tokens=False))
        for k in range(calls):
            chunk = todo[k * self.batch_size : (k + 1) * self.batch_size]
            if not chunk:  # this rank has nothing left: a throw-away call keeps the collectives in step
                self._generate(self.processor.pad_prompts([context(0, completions[0] + cue)]), 1, greedy)
                continue
            batch = self.processor.pad_prompts([context(i, completions[i] + cue) for i in chunk])
            out = self._generate(batch, self.answer_tokens, greedy)
            for i, ids in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
                answer, _ = self._cut(ids)
                completions[i] = completions[i] + cue + answer
                trained[i] = trained[i] + [False] * len(cue) + [True] * len(answer)

    def assemble(
        self,
        samples: list[dict[str, Any]],
        group_size: int,
        rows: Sequence[Mapping[str, torch.Tensor]],
        completions: Sequence[Sequence[int]],
        trained: Sequence[Sequence[bool]],
        truncated: Sequence[bool],
        extra_visual: Sequence[Sequence[Mapping[str, torch.Tensor]]] | None = None,
        tool_calls: Sequence[int] | None = None,
    ) -> Rollout:
        """Pad per-row completions into a :class:`Rollout` (``extra_visual``: images inside completions)."""
        prompts = self.processor.pad_prompts(rows)
        length, count = prompts["input_ids"].shape[1], len(rows)
        steps = max(1, max(len(c) for c in completions))
        body = torch.full((count, steps), self.pad_id, dtype=torch.long)
        mask = torch.zeros(count, steps, dtype=torch.bool)
        attn = torch.zeros(count, steps, dtype=torch.long)
        for i, (ids, flags) in enumerate(zip(completions, trained, strict=True)):
            body[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
            attn[i, : len(ids)] = 1
        inputs = {
            "attention_mask": torch.cat([prompts["attention_mask"], attn], 1),
            "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], (body == self.image_token_id).long()], 1),
        }
        images = [int(r["image_grid_thw"].shape[0]) if "image_grid_thw" in r else 0 for r in rows]
        pixels = [[r["pixel_values"]] if "pixel_values" in r else [] for r in rows]
        grids = [[r["image_grid_thw"]] if "image_grid_thw" in r else [] for r in rows]
        for i, extra in enumerate(extra_visual or []):
            for item in extra:
                pixels[i].append(item["pixel_values"])
                grids[i].append(item["image_grid_thw"])
                images[i] += int(item["image_grid_thw"].shape[0])
        if any(images):
            inputs["pixel_values"] = torch.cat([p for row in pixels for p in row])
            inputs["image_grid_thw"] = torch.cat([g for row in grids for g in row])
        videos = [int(r["video_grid_thw"].shape[0]) if "video_grid_thw" in r else 0 for r in rows]
        for key in ("pixel_values_videos", "video_grid_thw"):
            if key in prompts:
                inputs[key] = prompts[key]
        tok = self.processor.tokenizer
        return Rollout(
            samples=samples,
            group_size=group_size,
            sequences=torch.cat([prompts["input_ids"], body], 1),
            prompt_length=length,
            completion_mask=mask,
            texts=[decode_response(tok, ids) for ids in completions],
            truncated=torch.tensor(list(truncated), dtype=torch.bool),
            model_inputs=inputs,
            images_per_row=images,
            videos_per_row=videos,
            tool_calls=list(tool_calls) if tool_calls is not None else [0] * count,
        )
