"""Freeze and unfreeze a VLM by part, for staged training (REFERENCE.md section 4).

Qwen3-VL's stage S0 trains the merger only (vision tower and LLM frozen); later stages train
everything; adapter transfer (Skywork-R1V) trains the merger against a frozen LLM. These
helpers work on both layouts of this package:

- the core ``VLForConditionalGeneration``: ``model.model.visual``, ``model.model.language_model``,
  ``model.lm_head``;
- the composed ``ComposedVLForConditionalGeneration``: ``model.visual``, ``model.language_model``
  (a full causal LM, its ``lm_head`` included).

Parts: ``"vision"`` (patch and position embeddings, blocks), ``"merger"`` (the merge head:
``merger``, plus ``post_layernorm`` / ``downsample`` of a GLM tower), ``"deepstack"`` (the
DeepStack mergers), ``"llm"`` (the language model, ``lm_head`` included). Parameters added later
inside a part (e.g. LoRA adapters in the LLM) belong to that part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["PARTS", "freeze", "part_parameters", "trainable_parameters", "unfreeze"]

PARTS = ("vision", "merger", "deepstack", "llm")

_MERGE_HEAD = ("merger", "post_layernorm", "downsample")


def _layout(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """``(visual, language_model, lm_head or None)`` of either layout."""
    visual, lm = getattr(model, "visual", None), getattr(model, "language_model", None)
    if isinstance(visual, nn.Module) and isinstance(lm, nn.Module):
        return visual, lm, None
    inner = getattr(model, "model", None)
    visual, lm = getattr(inner, "visual", None), getattr(inner, "language_model", None)
    head = getattr(model, "lm_head", None)
    if isinstance(visual, nn.Module) and isinstance(lm, nn.Module):
        return visual, lm, head if isinstance(head, nn.Module) else None
    raise TypeError(
        f"{type(model).__name__} has neither `.visual` + `.language_model` (composed model) nor "
        "`.model.visual` + `.model.language_model` (VLForConditionalGeneration)"
    )


def _check_parts(parts: str | Iterable[str]) -> list[str]:
    names = [parts] if isinstance(parts, str) else list(parts)
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the parts are {list(PARTS)}")
    return names


def _modules(model: nn.Module, part: str) -> list[nn.Module | nn.Parameter]:
    visual, lm, head = _layout(model)
    if part == "llm":
        return [lm] if head is None else [lm, head]
    if part == "deepstack":
        ds = getattr(visual, "deepstack_merger_list", None)
        return [ds] if isinstance(ds, nn.Module) else []
    if part == "merger":
        return [m for name in _MERGE_HEAD if isinstance(m := getattr(visual, name, None), nn.Module)]
    skip = {"deepstack_merger_list", *_MERGE_HEAD}
    out: list[nn.Module | nn.Parameter] = [child for name, child in visual.named_children() if name not in skip]
    out.extend(p for _, p in visual.named_parameters(recurse=False))
    return out


def part_parameters(model: nn.Module, part: str) -> Iterator[nn.Parameter]:
    """The parameters of one part (each once, tied weights included once).

    Args:
        model: A ``VLForConditionalGeneration`` or a composed model.
        part: One of ``PARTS``.
    """
    _check_parts(part)
    seen: set[int] = set()
    for item in _modules(model, part):
        params = [item] if isinstance(item, nn.Parameter) else item.parameters()
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def _set(model: nn.Module, parts: str | Iterable[str], flag: bool) -> nn.Module:
    for part in _check_parts(parts):
        for p in part_parameters(model, part):
            p.requires_grad_(flag)
    return model


def freeze(model: nn.Module, parts: str | Iterable[str] = ("vision",)) -> nn.Module:
    """Set ``requires_grad=False`` on the parameters of ``parts``; returns ``model``.

    Example: stage S0 (merger and DeepStack mergers trained, tower and LLM frozen) is
    ``freeze(model, ("vision", "llm"))``.
    """
    return _set(model, parts, False)


def unfreeze(model: nn.Module, parts: str | Iterable[str] = PARTS) -> nn.Module:
    """Set ``requires_grad=True`` on the parameters of ``parts`` (default: all); returns ``model``."""
    return _set(model, parts, True)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per part (``"other"`` too, when something is outside them).

    Tied parameters are counted once, in the first part that holds them.
    """
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for part in PARTS:
        total = 0
        for p in part_parameters(model, part):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() if p.requires_grad else 0
        counts[part] = total
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen and p.requires_grad)
    if other:
        counts["other"] = other
    return counts
