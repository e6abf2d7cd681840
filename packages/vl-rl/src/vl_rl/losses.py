"""Policy-gradient losses of the GRPO family as one pure function, ``policy_loss``.

Methods (REFERENCE.md section 5), with their default clip range and aggregation:

    ======== =============================== ============== ==================================
    method   per-token objective             clip (lo, hi)  aggregation
    ======== =============================== ============== ==================================
    grpo     min(r A, clip(r) A)             0.2, 0.2       SEQ-MEAN   (arXiv 2402.03300)
    dr_grpo  min(r A, clip(r) A)             0.2, 0.2       CONST, C = max_tokens (2503.20783)
    dapo     min(r A, clip(r) A)             0.2, 0.28      TOKEN-MEAN (2503.14476)
    gspo     min(s A, clip(s) A) per seq     3e-4, 4e-4     mean over sequences (2507.18071)
    gspo_tok min(s_t A, clip(s_t) A)         3e-4, 4e-4     SEQ-MEAN   (2507.18071, eq. 13)
    sapo     (4 / tau) sigmoid(tau (r-1)) A  none (soft)    SEQ-MEAN   (2511.20347)
    cispo    sg[clip(r)] A log pi            none, 0.28     TOKEN-MEAN (2506.13585, eq. 4)
    ======== =============================== ============== ==================================

The loss is the negative objective plus ``kl_coef`` times a per-token KL estimate (k1/k2/k3,
see ``_kl``), aggregated as above; ``aggregation`` overrides the default.

Choices made here:
    * clip(x) = clamp(x, 1 - clip_low, 1 + clip_high).
    * CISPO: MiniMax-M1 sets no lower bound on the IS weight ("setting eps_low to a large value")
      and tunes only eps_high without publishing a number; our default is no floor and
      eps_high = 0.28 (DAPO's clip-higher, also verl's and Trinity-RFT's CISPO default).
      Passing ``clip_low`` adds a floor.
    * GSPO needs per-sequence advantages ``[B]``; ``gspo_token`` also takes per-token ``[B, T]``.
      For ``gspo`` an aggregation override weighs sequence i's loss by the weights its tokens
      would get (TOKEN-MEAN: by length).
    * SAPO has no hard clip, so its clip fractions are 0 and clip arguments are rejected.

Numerics: log-ratios are computed in float32 (float64 inputs stay float64) from any input dtype
(bf16 allowed), with no wider ``[B, T]`` intermediate; masked positions are removed bit for bit
(``where(m, x, 0)``, done as a 0/1 integer multiply of the bits, see ``_fused``), so their values,
even NaN, never reach the loss or the gradient. Gradients are exact closed forms applied by one
``[B, T]`` coefficient (``_fused.SurrogateLoss``); only ``logprobs`` receives a gradient, and the
loss can be backpropagated once (the coefficient is scaled in place).

Notation: B sequences, T positions, m [B, T] loss mask, n_i tokens of sequence i,
r = exp(log pi_theta - log pi_old) per token, s_i = exp(mean_t log r_{i,t}) (GSPO),
A advantages, sg stop-gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from vl_rl import _fused
from vl_rl._aggregate import AGGREGATIONS, Aggregation, aggregate, row_weights
from vl_rl._kl import KL_ESTIMATORS, KLEstimator, kl_estimate, kl_from_log_ratio

__all__ = [
    "METHOD_DEFAULTS",
    "Aggregation",
    "KLEstimator",
    "PolicyMethod",
    "aggregate",
    "kl_estimate",
    "policy_loss",
]

PolicyMethod = Literal["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "cispo"]

# method -> (clip_low, clip_high, aggregation); None = no bound on that side.
METHOD_DEFAULTS: dict[str, tuple[float | None, float | None, Aggregation]] = {
    "grpo": (0.2, 0.2, "seq_mean"),
    "dr_grpo": (0.2, 0.2, "const"),
    "dapo": (0.2, 0.28, "token_mean"),
    "gspo": (3e-4, 4e-4, "seq_mean"),
    "gspo_token": (3e-4, 4e-4, "seq_mean"),
    "sapo": (None, None, "seq_mean"),
    "cispo": (None, 0.28, "token_mean"),
}


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_shapes(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {_shape(logprobs)}")
    bt = _shape(logprobs)
    named = {"old_logprobs": old_logprobs, "mask": mask, "ref_logprobs": ref_logprobs, "entropy": entropy}
    for name, x in named.items():
        if x is not None and _shape(x) != bt:
            raise ValueError(f"{name} has shape {_shape(x)} but logprobs has {bt}")
    if _shape(advantages) not in ((bt[0],), bt):
        raise ValueError(f"advantages must be [B]=({bt[0]},) or [B, T]={bt}, got {_shape(advantages)}")


def _resolve_clip(method: str, clip_low: float | None, clip_high: float | None) -> tuple[float | None, float | None]:
    lo_default, hi_default, _ = METHOD_DEFAULTS[method]
    if method == "sapo":
        if clip_low is not None or clip_high is not None:
            raise ValueError("sapo uses a soft gate (tau_pos, tau_neg), not clip_low/clip_high")
        return None, None
    lo = lo_default if clip_low is None else clip_low
    hi = hi_default if clip_high is None else clip_high
    for name, v in (("clip_low", lo), ("clip_high", hi)):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    return (None if lo is None else 1.0 - lo), (None if hi is None else 1.0 + hi)


def _raise_non_finite(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    ref: torch.Tensor | None,
    m: torch.Tensor,
    adv_mask: torch.Tensor,
) -> None:
    n_tok = int(m.sum())
    checks = [("logprobs", lp, m), ("old_logprobs", old, m), ("advantages", adv, adv_mask)]
    if ref is not None:
        checks.append(("ref_logprobs", ref, m))
    for name, x, where in checks:
        bad = int((~torch.isfinite(x) & where).sum())
        if bad:
            raise ValueError(
                f"{name} has {bad} NaN/inf values at unmasked positions "
                f"(of {int(where.sum())} unmasked entries, {n_tok} unmasked tokens)"
            )
    raise ValueError(
        "the loss is not finite although the inputs are: exp overflowed (log-ratio > ~88 in float32, or a "
        "KL estimate's exp(log pi_ref - log pi))"
    )


def _bounds(lo: float | None, hi: float | None) -> tuple[float, float]:
    """Ratio bounds with None (no bound on that side) as -inf / inf."""
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


def _clip_objective(
    x: torch.Tensor, adv: torch.Tensor, lo: float | None, hi: float | None, w_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clip on x = r (per token) or s (per sequence), summed with weights ``-w_neg``.

    Returns ``(value, coef, active)``: value = -sum W min(x A, clip(x) A); coef = d value / d log x
    (d x / d log x = x), nonzero only where the unclipped branch is the minimum (``active``).
    """
    xa = x * adv
    xca = x.clamp(lo, hi).mul_(adv)
    active = xa <= xca
    value = (torch.minimum(xa, xca, out=xca) * w_neg).sum()
    coef = torch.where(active, xa.mul_(w_neg), xa.new_zeros(()), out=xa)
    return value, coef, active


def _count(flags: torch.Tensor) -> torch.Tensor:
    """Number of nonzero entries, as a float32 scalar."""
    return flags.count_nonzero().to(torch.float32)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: PolicyMethod = "grpo",
    clip_low: float | None = None,
    clip_high: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation | None = None,
    entropy: torch.Tensor | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one mini-batch for the chosen method.

    Args:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (carries the gradient).
        old_logprobs: ``[B, T]`` log pi_old from the rollout.
        advantages: ``[B]`` per sequence or ``[B, T]`` per token.
        mask: ``[B, T]`` loss mask (nonzero = the token counts; prompt, padding and tool outputs 0).
        method: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``gspo_token``, ``sapo`` or ``cispo``.
        clip_low: ratio floor is ``1 - clip_low``; None takes the method default.
        clip_high: ratio cap is ``1 + clip_high``; None takes the method default.
        tau_pos: SAPO temperature for A > 0.
        tau_neg: SAPO temperature for A <= 0.
        max_tokens: C of the CONST aggregation (Dr. GRPO's maximum generation length); default T.
        ref_logprobs: ``[B, T]`` log pi_ref for the KL penalty and the ``kl`` metric.
        kl_coef: weight of the KL penalty (needs ``ref_logprobs`` when nonzero).
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        aggregation: ``seq_mean``, ``token_mean`` or ``const``; None takes the method default.
        entropy: ``[B, T]`` per-token entropy, only reported (token mean) as a metric.
        check_finite: raise on NaN/inf at unmasked positions (one host sync); disable in
            tight loops once inputs are trusted.

    Returns:
        ``(loss, metrics)``: a scalar loss to minimise, and detached float32 scalars
        ``clip_frac_low``, ``clip_frac_high`` (share of unmasked tokens, or of non-empty sequences
        for ``gspo``, whose objective was cut by the floor / the cap), ``ratio_mean`` (token mean of
        r; of s_i for the GSPO methods), plus ``kl`` and ``entropy`` (token means) when given.
        The loss supports one backward pass (a second one raises ``RuntimeError``).

    Raises:
        ValueError: for mismatched shapes (naming them), an unknown method/aggregation/estimator,
            negative clips, NaN/inf at unmasked positions (naming the count), ``kl_coef`` without
            ``ref_logprobs``, or per-token advantages with ``gspo``.
    """
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"method must be one of {tuple(METHOD_DEFAULTS)}, got {method!r}")
    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS} or None, got {aggregation!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"tau_pos and tau_neg must be positive, got {tau_pos} and {tau_neg}")
    _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    per_token_adv = advantages.dim() == 2
    if method == "gspo" and per_token_adv:
        raise ValueError(
            f"gspo needs per-sequence advantages [B]=({logprobs.shape[0]},), got {_shape(advantages)}; "
            "use method='gspo_token' for per-token advantages"
        )
    lo, hi = _resolve_clip(method, clip_low, clip_high)
    agg: Aggregation = METHOD_DEFAULTS[method][2] if aggregation is None else aggregation

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask if mask.dtype == torch.bool else mask != 0
    with torch.no_grad():
        lp = logprobs.detach()
        ref = None if ref_logprobs is None else ref_logprobs.detach()
        # GSPO with per-sequence advantages needs only row sums of the log-ratio, CISPO one pass per
        # token: both run in cache-sized row blocks and count the tokens themselves.
        gspo_rows = method in ("gspo", "gspo_token") and not per_token_adv
        if gspo_rows:
            row_sum, n_int = _fused.masked_row_sums(lp, old_logprobs.detach(), m, dtype)
        elif method == "cispo":
            adv_in = advantages.detach().to(dtype)
            cis_rows, coef, n_int, ratio_sum, n_low, n_high = _fused.cispo(
                lp, old_logprobs.detach(), adv_in, m, dtype, lo, hi
            )
        blocked = gspo_rows or method == "cispo"
        # select_(x, mi) = where(m, x, 0), bit for bit; the bool mask suffices where nothing is selected
        light = blocked and not per_token_adv and ref is None and entropy is None
        mi = m if light else _fused.int_mask(m, dtype)
        n_tok = n_int.to(dtype) if blocked else mi.sum(dim=1, dtype=mi.dtype).to(dtype)
        n_all = n_tok.sum().clamp(min=1.0).to(torch.float32)
        nonempty = n_tok[:, None] > 0
        if per_token_adv:
            adv_mask = m
            adv = _fused.selected(advantages.detach().to(dtype), mi)
        else:
            adv_mask = nonempty
            adv = torch.where(nonempty, advantages.detach().to(dtype)[:, None], 0.0)
        w = row_weights(n_tok, agg, seq_len=m.shape[1], max_tokens=max_tokens)
        if not blocked:
            d = _fused.log_ratio(lp, old_logprobs.detach(), dtype)
            if method != "cispo":  # where before exp: NaN/garbage at masked positions must not propagate
                _fused.select_(d, mi)
        # Sums that are finite iff every input term that matters is; checked with one host sync below.
        checks = [adv.sum()]
        metrics: dict[str, torch.Tensor] = {}
        kl = dkl = None
        if ref is not None:
            kl_x = _fused.select_(_fused.log_ratio(ref, lp, dtype), mi)  # log pi_ref - log pi, 0 where masked
            checks.append(kl_x.sum())
            kl, dkl = kl_from_log_ratio(kl_x, m, kl_estimator)  # both 0 at masked positions
            metrics["kl"] = kl.sum().to(torch.float32) / n_all
        if entropy is not None:
            ent = _fused.selected(entropy.detach().to(dtype), mi)
            metrics["entropy"] = ent.sum().to(torch.float32) / n_all
        row_coef = False  # coef is [B, 1] per sequence (GSPO), spread over the mask in backward
        scale = None  # [B, 1] weights the backward applies to coef (CISPO)
        zero = n_tok.new_zeros(())
        if method in ("gspo", "gspo_token"):
            row_sum = row_sum[:, None] if gspo_rows else d.sum(dim=1, keepdim=True)
            checks.append(row_sum.sum())
            seq = torch.exp(row_sum / n_tok.clamp(min=1.0)[:, None])  # s_i [B, 1]
            n_seq = nonempty.count_nonzero().clamp(min=1).to(torch.float32)
            metrics["ratio_mean"] = torch.where(nonempty, seq, 0.0).sum().to(torch.float32) / n_seq
            if per_token_adv:  # gspo_token only: s_{i,t} has value s_i and d s_{i,t} / d log pi_t = s_i
                value, coef, n_low, n_high = _fused.gspo_token_per_token(seq, adv, w, *_bounds(lo, hi))
                metrics["clip_frac_low"], metrics["clip_frac_high"] = n_low / n_all, n_high / n_all
            else:
                # every token of row i carries the loss of s_i, so the row weight is sum_t W = n_i w_i;
                # d log s_i / d log pi_t = 1 / n_i (gspo), and s_{i,t} gives the same coefficient.
                value, coef_row, active = _clip_objective(seq, adv, lo, hi, -w * n_tok[:, None])
                coef, row_coef = coef_row / n_tok.clamp(min=1.0)[:, None], True
                low, high = ~active & (seq < 1) & nonempty, ~active & (seq > 1) & nonempty
                if method == "gspo":
                    metrics["clip_frac_low"], metrics["clip_frac_high"] = _count(low) / n_seq, _count(high) / n_seq
                else:
                    n32 = n_tok.to(torch.float32)
                    metrics["clip_frac_low"] = (low[:, 0] * n32).sum() / n_all
                    metrics["clip_frac_high"] = (high[:, 0] * n32).sum() / n_all
        elif method == "cispo":
            value, scale = (w[:, 0] * cis_rows).sum(), w
            checks.append(ratio_sum)  # NaN or +inf anywhere unmasked reaches this sum
            metrics["ratio_mean"] = ratio_sum.to(torch.float32) / n_all
            metrics["clip_frac_low"], metrics["clip_frac_high"] = n_low / n_all, n_high / n_all
        else:
            d.exp_().sub_(1.0)  # r - 1: 0 at masked positions, so its sums are over tokens, without cancellation
            ratio_sum = d.sum() + n_tok.sum()
            checks.append(ratio_sum)
            metrics["ratio_mean"] = ratio_sum.to(torch.float32) / n_all
            if method == "sapo":
                value, coef = _fused.sapo(d, adv, w, mi, n_tok, tau_pos, tau_neg)
                metrics["clip_frac_low"], metrics["clip_frac_high"] = _count(zero), _count(zero)
            else:
                value, coef, n_low, n_high = _fused.clip_family(d, adv, w, mi, n_tok, *_bounds(lo, hi))
                metrics["clip_frac_low"], metrics["clip_frac_high"] = n_low / n_all, n_high / n_all
        if kl is not None and dkl is not None and kl_coef != 0.0:
            value = value + kl_coef * (kl.sum(dim=1) * w[:, 0]).sum()
            if row_coef:
                coef, row_coef = _fused.selected(coef.expand_as(kl), mi), False
            if scale is not None:
                coef, scale = coef.mul_(scale), None
            coef = coef.add_(dkl.mul_(w), alpha=kl_coef)
        checks.append(value)
        if check_finite and not bool(torch.isfinite(torch.stack([c.to(dtype) for c in checks])).all()):
            ref_c = None if ref is None else ref.to(dtype)
            _raise_non_finite(lp.to(dtype), old_logprobs.detach().to(dtype), adv, ref_c, m, adv_mask)
        metrics = {k: v.detach().to(torch.float32) for k, v in metrics.items()}

    loss = _fused.SurrogateLoss.apply(logprobs, value, coef, mi if row_coef else None, scale)
    return loss, metrics
