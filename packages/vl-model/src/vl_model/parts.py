"""Freeze and unfreeze a VLM by part, for staged training (REFERENCE.md section 4).

Qwen3-VL's stage S0 trains the merger only (vision tower and LLM frozen); later stages train
everything; adapter transfer (Skywork-R1V) trains the merger against a frozen LLM. The parts come
from the model itself (``part_modules`` of :class:`vl_model.runtime.TrainableVLM`), so the core
``VLForConditionalGeneration`` and the composed model work alike.

Parts: ``"vision"`` (patch and position embeddings, blocks), ``"merger"`` (the merge head:
``merger``, plus ``post_layernorm`` / ``downsample`` of a GLM tower), ``"deepstack"`` (the
DeepStack mergers), ``"llm"`` (the language model, its output head included). Parameters added later
inside a part (e.g. LoRA adapters in the LLM) belong to that part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from .runtime import PARTS

__all__ = ["PARTS", "freeze", "part_parameters", "trainable_parameters", "unfreeze"]


def _check_parts(parts: str | Iterable[str]) -> list[str]:
    names = [parts] if isinstance(parts, str) else list(parts)
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the parts are {list(PARTS)}")
    return names


def _modules(model: nn.Module, part: str) -> list[nn.Module | nn.Parameter]:
    modules = getattr(model, "part_modules", None)
    if not callable(modules):
        raise TypeError(
            f"{type(model).__name__} has no part_modules(): parts are defined for the models of vl_model "
            "(VLForConditionalGeneration, ComposedVLForConditionalGeneration; see vl_model.runtime)"
        )
    return list(modules(part))


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
