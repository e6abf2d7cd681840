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
(bf16 allowed); masked positions are removed with ``where`` before any ``exp``, so their values,
even NaN, never reach the loss or the gradient. Gradients are exact closed forms applied by one
``[B, T]`` coefficient (``SurrogateLoss``); only ``logprobs`` receives a gradient.

Notation: B sequences, T positions, m [B, T] loss mask, n_i tokens of sequence i,
r = exp(log pi_theta - log pi_old) per token, s_i = exp(mean_t log r_{i,t}) (GSPO),
A advantages, sg stop-gradient.
"""

from __future__ import annotations

from typing import Literal

import torch

from vl_rl._aggregate import AGGREGATIONS, Aggregation, SurrogateLoss, aggregate, row_weights
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


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y) in one pass (BLAS dot) for same-shape tensors."""
    return torch.dot(x.reshape(-1), y.reshape(-1))


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
    value = _dot(torch.minimum(xa, xca, out=xca), w_neg)
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
        lp = logprobs.detach().to(dtype)
        zero = lp.new_zeros(())
        mask_f = m.to(dtype)
        n_tok = mask_f.sum(dim=1)
        n_all = n_tok.sum().clamp(min=1.0).to(torch.float32)
        # where before exp: NaN/garbage at masked positions must not propagate.
        log_ratio = lp - old_logprobs.detach().to(dtype)
        # CISPO without a floor: -inf makes r = 0 at masked positions, so sg[min(r, 1 + e)] A is
        # already 0 there and no mask multiply is needed; every other method wants r = 1 there.
        no_floor_cispo = method == "cispo" and lo is None
        fill = lp.new_full((), float("-inf")) if no_floor_cispo else zero
        log_ratio = torch.where(m, log_ratio, fill, out=log_ratio)
        if per_token_adv:
            adv_mask = m
            adv = torch.where(m, advantages.detach().to(dtype), zero)
        else:
            adv_mask = (n_tok > 0)[:, None]
            adv = torch.where(adv_mask, advantages.detach().to(dtype)[:, None], zero)
        ref = None if ref_logprobs is None else ref_logprobs.detach().to(dtype)
        kl_x = None if ref is None else torch.where(m, ref - lp, zero)
        row_w = row_weights(n_tok, agg, seq_len=m.shape[1], max_tokens=max_tokens)
        # Sums that are finite iff every input term that matters is; checked with one host sync below.
        checks = [adv.sum()] + ([] if kl_x is None else [kl_x.sum()])
        metrics: dict[str, torch.Tensor] = {}
        if method in ("gspo", "gspo_token"):
            row_sum = log_ratio.sum(dim=1)
            checks.append(row_sum.sum())
            seq = torch.exp(row_sum / n_tok.clamp(min=1.0))[:, None]  # s_i [B, 1]
            nonempty = n_tok[:, None] > 0
            n_seq = nonempty.count_nonzero().clamp(min=1).to(torch.float32)
            metrics["ratio_mean"] = torch.where(nonempty, seq, zero).sum().to(torch.float32) / n_seq
            if per_token_adv:  # gspo_token only: s_{i,t} has value s_i and d s_{i,t} / d log pi_t = s_i
                value, coef, active = _clip_objective(seq.expand_as(lp), adv, lo, hi, mask_f * -row_w)
                metrics["clip_frac_low"] = _count(~active & (seq < 1) & m) / n_all
                metrics["clip_frac_high"] = _count(~active & (seq > 1) & m) / n_all
            else:
                # every token of row i carries the loss of s_i, so the row weight is sum_t W = n_i w_i;
                # d log s_i / d log pi_t = 1 / n_i (gspo), and s_{i,t} gives the same coefficient.
                value, coef_row, active = _clip_objective(seq, adv, lo, hi, -row_w * n_tok[:, None])
                coef = mask_f * (coef_row / n_tok.clamp(min=1.0)[:, None])
                low, high = ~active & (seq < 1) & nonempty, ~active & (seq > 1) & nonempty
                if method == "gspo":
                    metrics["clip_frac_low"], metrics["clip_frac_high"] = _count(low) / n_seq, _count(high) / n_seq
                else:
                    n32 = n_tok.to(torch.float32)
                    metrics["clip_frac_low"] = (low[:, 0] * n32).sum() / n_all
                    metrics["clip_frac_high"] = (high[:, 0] * n32).sum() / n_all
        else:
            ratio = log_ratio.exp_()  # exactly 1 (0 for no_floor_cispo) at masked positions
            ratio_sum = ratio.sum() if no_floor_cispo else _dot(ratio, mask_f)
            checks.append(ratio_sum)  # NaN or +inf anywhere unmasked reaches this sum
            metrics["ratio_mean"] = ratio_sum.to(torch.float32) / n_all
            # -A W with W = mask * w: zero at masked positions (per-token advantages already are)
            aw = adv * -row_w if per_token_adv or no_floor_cispo else mask_f * (adv * -row_w)
            if method == "sapo":
                tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))
                gate = torch.addcmul(-tau, ratio, tau).sigmoid_()  # sigma(tau (r - 1))
                value = _dot(gate, aw.mul(4.0 / tau))
                # d f / d r = 4 sigma (1 - sigma) = sech^2(tau (r - 1) / 2); d r / d log pi = r.
                coef = torch.addcmul(gate, gate, gate, value=-1.0).mul_(ratio).mul_(aw.mul_(4.0))
                metrics["clip_frac_low"], metrics["clip_frac_high"] = _count(zero), _count(zero)
            elif method == "cispo":
                metrics["clip_frac_low"] = _count(zero) if lo is None else _count(ratio < lo) / n_all  # r = 1 at masked
                metrics["clip_frac_high"] = _count(zero) if hi is None else _count(ratio > hi) / n_all
                coef = ratio.clamp_(lo, hi).mul_(aw)  # sg[clip(r)] A log pi: d / d log pi = sg[clip(r)] A
                value = _dot(coef, torch.where(m, lp, zero))
            else:
                value, coef, active = _clip_objective(ratio, adv, lo, hi, mask_f * -row_w)
                # active is True at masked positions (r = 1); a clipped token's side is the sign of A.
                metrics["clip_frac_low"] = _count(~active & (adv < 0)) / n_all
                metrics["clip_frac_high"] = _count(~active & (adv > 0)) / n_all
        checks.append(value)
        if kl_x is not None:
            kl, dkl = kl_from_log_ratio(kl_x, m, kl_estimator)
            metrics["kl"] = _dot(kl, mask_f).to(torch.float32) / n_all
            if kl_coef != 0.0:
                w = mask_f * row_w
                value = value + kl_coef * _dot(kl, w)
                coef = coef.add_(dkl.mul_(w), alpha=kl_coef)
        if entropy is not None:
            metrics["entropy"] = torch.where(m, entropy.detach().to(dtype), 0.0).sum().to(torch.float32) / n_all
        if check_finite and not bool(torch.isfinite(torch.stack([c.to(dtype) for c in checks])).all()):
            _raise_non_finite(lp, old_logprobs.detach().to(dtype), adv, ref, m, adv_mask)
        metrics = {k: v.detach().to(torch.float32) for k, v in metrics.items()}

    loss = SurrogateLoss.apply(logprobs, value, coef)
    return loss, metrics
