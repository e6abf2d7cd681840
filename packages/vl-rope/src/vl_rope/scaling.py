"""Inverse rotary frequencies and their context-extension scalings.

Implements RoFormer's frequencies ``inv_freq_i = theta^(-2i/d)`` (arXiv 2104.09864)
and the scalings used to stretch a trained context window:

- ``linear`` (position interpolation, arXiv 2306.15595): ``inv_freq / factor``.
- ``dynamic`` (NTK-aware, recomputed from the current length): the base grows to
  ``theta * (factor * L / L_max - (factor - 1))^(d / (d - 2))`` once ``L > L_max``.
- ``yarn`` (arXiv 2309.00071): per-frequency blend of interpolation and
  extrapolation with a linear ramp between the ``beta_fast``/``beta_slow``
  correction dims, and an attention factor ``0.1 ln(factor) + 1`` applied to cos/sin.

Every computation runs in float32 in the same order as transformers' rope init
functions, so frequencies are bit-identical to them: at position 8192 a single
ulp of ``inv_freq`` already moves cos/sin by ~1e-3.

Notation: ``d`` rotary dims, ``theta`` base, ``L`` current length, ``L_max`` trained length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

ScalingType = Literal["default", "linear", "dynamic", "yarn"]

__all__ = ["RopeScaling", "ScalingType", "default_inv_freq", "rope_frequencies"]


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How rotary frequencies are scaled for context extension.

    Args:
        rope_type: ``"default"`` (none), ``"linear"``, ``"dynamic"`` or ``"yarn"``.
        factor: Context stretch factor (e.g. 4.0 for 256K -> 1M).
        original_max_position_embeddings: Trained length (YaRN's correction range; required for yarn).
        max_position_embeddings: The model's max length; dynamic NTK grows beyond it. For YaRN,
            ``factor`` defaults to ``max_position_embeddings / original_max_position_embeddings``.
        attention_factor: YaRN cos/sin scale; inferred from ``factor`` (and ``mscale``) when None.
        beta_fast: YaRN fast boundary (rotations), 32 by default.
        beta_slow: YaRN slow boundary (rotations), 1 by default.
        mscale: DeepSeek-style YaRN mscale numerator.
        mscale_all_dim: DeepSeek-style YaRN mscale denominator.
        truncate: Round YaRN's correction range to whole dims (the paper's choice).
    """

    rope_type: ScalingType = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "dynamic", "yarn"):
            raise ValueError(
                f"unknown rope_type {self.rope_type!r}; expected one of 'default', 'linear', 'dynamic', 'yarn'"
            )
        if self.rope_type in ("linear", "dynamic") and self.factor is None:
            raise ValueError(f"rope_type {self.rope_type!r} needs `factor`")
        if self.rope_type == "dynamic" and self.max_position_embeddings is None:
            raise ValueError("rope_type 'dynamic' needs `max_position_embeddings` (the trained length)")
        if self.rope_type == "yarn":
            if self.original_max_position_embeddings is None:
                raise ValueError("rope_type 'yarn' needs `original_max_position_embeddings` (the trained length)")
            if self.factor is None and self.max_position_embeddings is None:
                raise ValueError("rope_type 'yarn' needs `factor` or `max_position_embeddings`")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"`factor` must be positive, got {self.factor}")

    @classmethod
    def from_hf(cls, params: Mapping[str, Any] | None, *, max_position_embeddings: int | None = None) -> RopeScaling:
        """Build from a transformers ``rope_parameters`` / legacy ``rope_scaling`` dict.

        Keys that only describe the layout (``rope_theta``, ``mrope_section``,
        ``mrope_interleaved``, ``partial_rotary_factor``) are ignored here; unknown
        keys raise so that a typo never silently disables scaling.
        """
        if not params:
            return cls(max_position_embeddings=max_position_embeddings)
        layout_keys = {"rope_theta", "mrope_section", "mrope_interleaved", "partial_rotary_factor", "type", "rope_type"}
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known - layout_keys
        if unknown:
            raise ValueError(f"unknown rope scaling keys {sorted(unknown)}; known: {sorted(known | layout_keys)}")
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs["rope_type"] = params.get("rope_type", params.get("type", "default"))
        kwargs.setdefault("max_position_embeddings", max_position_embeddings)
        for key in ("beta_fast", "beta_slow"):  # transformers treats None as "use the default"
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The non-default fields, as a transformers-style ``rope_parameters`` dict."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def default_inv_freq(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``theta^(-2i/dim)`` for ``i < dim/2``, float32 ``[dim/2]``."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"the rotary dim must be a positive even number, got {dim}")
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def _yarn(dim: int, theta: float, s: RopeScaling, device: torch.device | str | None) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings
    assert original is not None  # checked in RopeScaling
    factor = s.factor
    if factor is None:
        assert s.max_position_embeddings is not None
        factor = s.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength completes `rotations` turns over the trained length
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep = 1 - ramp  # 1 where the wavelength is short enough to extrapolate unchanged
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_frequencies(
    dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    *,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin attention factor for one rotary embedding.

    Args:
        dim: Rotary dims (``head_dim * partial_rotary_factor``), even.
        theta: Base (``rope_theta``).
        scaling: Context-extension scaling; None means ``default``.
        seq_len: Current length, used only by ``dynamic`` (frequencies grow past the trained length).
        device: Device of the result.

    Returns:
        ``(inv_freq [dim/2] float32, attention_factor)``.
    """
    s = scaling or RopeScaling()
    if s.rope_type == "default":
        return default_inv_freq(dim, theta, device), 1.0
    if s.rope_type == "linear":
        assert s.factor is not None
        return default_inv_freq(dim, theta, device) / s.factor, 1.0
    if s.rope_type == "dynamic":
        assert s.factor is not None and s.max_position_embeddings is not None
        length = max(seq_len or 0, s.max_position_embeddings)
        base = theta * ((s.factor * length / s.max_position_embeddings) - (s.factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(dim, base, device), 1.0
    return _yarn(dim, theta, s, device)
