"""What a composed VLM installs into a Hugging Face causal LM: DeepStack hooks and MRoPE.

DeepStack (arXiv 2406.04334; Qwen3-VL, arXiv 2511.21631 section 2): ``DeepStackInjector`` adds
the DeepStack features at the visual positions to the outputs of the LM's first decoder layers
through forward hooks, so any LM with ``model.layers`` / ``get_decoder().layers`` works.

MRoPE: Qwen3-VL's interleaved 3-D rotary inside any rotate-half LM.

Llama, Qwen2 and Qwen3 decoders compute ``(cos, sin) = model.rotary_emb(hidden, position_ids)``
once per forward and rotate q/k with ``rotate_half``, exactly as Qwen3-VL's text model does;
only the angles differ. Replacing ``rotary_emb`` with ``MRoPERotary`` (angles from
``vl_rope.MRoPE`` and the 3-D position ids of ``vl_rope.get_rope_index``) therefore turns such
an LM into an MRoPE decoder (Qwen3-VL, arXiv 2511.21631 section 2; REFERENCE.md section 1)
without touching its weights or its state-dict keys (the rotary holds no persistent state).

Notation: ``B`` batch, ``L`` sequence length, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vl_rope import MRoPE

__all__ = ["DeepStackInjector", "MRoPERotary", "decoder_layers", "default_mrope_section", "install_mrope"]


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (``model.layers`` or ``get_decoder().layers``).

    Raises:
        ValueError: The LM exposes neither.
    """
    inner = getattr(language_model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    get_decoder = getattr(language_model, "get_decoder", None)
    if callable(get_decoder):
        layers = getattr(get_decoder(), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(language_model).__name__}: expected `model.layers` or "
        "`get_decoder().layers` (needed for the DeepStack injection)"
    )


class DeepStackInjector:
    """Adds DeepStack feature ``i`` at the visual positions to the output of decoder layer ``i``.

    The hooks stay registered and read the features of the current forward from here: with
    activation checkpointing the layer (and its hook) runs again in the backward pass, which
    must see the same features as the forward.
    """

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layers: nn.ModuleList, count: int) -> None:
        """Hook the first ``count`` layers (removing any earlier hooks)."""
        self.detach()
        if count > len(layers):
            raise ValueError(f"{count} DeepStack mergers but the language model has only {len(layers)} layers")
        for i in range(count):
            self.handles.append(layers[i].register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        """Remove every hook."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.positions is None or index >= len(self.features):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            feats = self.features[index].to(hidden.dtype)
            hidden = hidden.index_put(self.positions, feats, accumulate=True)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's ``[24, 20, 20]`` split of 64 frequencies, scaled to ``head_dim / 2``."""
    n = head_dim // 2
    hw = round(n * 20 / 64)
    return [n - 2 * hw, hw, hw]


class MRoPERotary(nn.Module):
    """Stand-in for an LM's ``rotary_emb``: ``(x, position_ids) -> (cos, sin)`` ``[B, L, D]``.

    Uses ``positions`` (``[3, B, L]``, set by the composed model for the current forward) when
    given, else the LM's own ``position_ids`` on all three axes (text-only positions).

    Args:
        head_dim: Attention head dim ``D``.
        theta: Frequency base (the LM's ``rope_theta``).
        mrope_section: Frequencies per axis ``(t, h, w)``, summing to ``D / 2``.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]) -> None:
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, float(theta), [int(s) for s in mrope_section]
        # Kept out of the module tree: no state-dict keys, and `model.to(bfloat16)` must not cast
        # the float32 frequencies. Built on the CPU even under `from_pretrained`'s meta device
        # (the frequencies are no checkpoint tensors, nothing would fill them in).
        with torch.device("cpu"):
            self._rope = (MRoPE(head_dim, self.theta, self.mrope_section, interleaved=True),)
        self.positions: torch.Tensor | None = None

    def _rotary(self, device: torch.device) -> MRoPE:
        rope = self._rope[0]
        if rope.inv_freq.device != device:
            rope.to(device)
        return rope

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin in ``x``'s dtype for the current positions."""
        positions = self.positions if self.positions is not None else position_ids
        return self._rotary(x.device)(positions.to(x.device), dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, mrope_section={self.mrope_section}"


def _decoder(language_model: nn.Module) -> nn.Module:
    inner = getattr(language_model, "model", None)
    if isinstance(getattr(inner, "rotary_emb", None), nn.Module):
        assert isinstance(inner, nn.Module)
        return inner
    get_decoder = getattr(language_model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
            return decoder
    raise ValueError(
        f"position_style='mrope' needs a decoder with one shared `rotary_emb` (Llama/Qwen2/Qwen3 style); "
        f"{type(language_model).__name__} has none"
    )


def install_mrope(language_model: nn.Module, mrope_section: Sequence[int] | None) -> MRoPERotary:
    """Replace the LM's rotary embedding by an ``MRoPERotary`` with the LM's head dim and theta.

    Raises:
        ValueError: no shared ``rotary_emb``, a scaled rotary (only the default rope type is
            supported), or a section that does not sum to ``head_dim / 2``.
    """
    decoder = _decoder(language_model)
    config: Any = getattr(language_model, "config", None)
    rope: dict[str, Any] = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"position_style='mrope' supports the default rope type only, the LM has {rope_type!r}")
    if "rope_theta" not in rope:
        raise ValueError("position_style='mrope' needs rope_parameters['rope_theta'] in the LM config")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    section = list(mrope_section) if mrope_section is not None else default_mrope_section(head_dim)
    if sum(section) != head_dim // 2 or len(section) != 3:
        raise ValueError(
            f"mrope_section {section} must have 3 entries summing to head_dim / 2 = {head_dim // 2} "
            f"(head_dim = {head_dim})"
        )
    rotary = MRoPERotary(head_dim, float(rope["rope_theta"]), section)
    decoder.rotary_emb = rotary
    return rotary
