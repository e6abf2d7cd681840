"""Naive float64 references for the RL losses, written directly from the formulas in
REFERENCE.md section 5 and the papers; one sequence at a time, gradients by autograd.

Deliberately independent of ``vl_rl``: no shared helpers, no closed-form gradients.
"""

from __future__ import annotations

import math
import statistics

import torch

DEFAULTS = {
    "grpo": (0.2, 0.2, "seq_mean"),
    "dr_grpo": (0.2, 0.2, "const"),
    "dapo": (0.2, 0.28, "token_mean"),
    "gspo": (3e-4, 4e-4, "seq_mean"),
    "gspo_token": (3e-4, 4e-4, "seq_mean"),
    "sapo": (None, None, "seq_mean"),
    "cispo": (None, 0.28, "token_mean"),
}


def ref_group_advantages(rewards: list[list[float]], scale: str, eps: float = 1e-6) -> list[list[float]]:
    """Python-float loops with ``statistics`` (sample std)."""
    flat = [x for row in rewards for x in row]
    batch_std = statistics.stdev(flat)
    out = []
    for row in rewards:
        mu = statistics.fmean(row)
        if max(row) == min(row):
            out.append([0.0] * len(row))
            continue
        if scale == "group":
            sd = statistics.stdev(row)
            out.append([(x - mu) / (sd + eps) for x in row])
        elif scale == "batch":
            out.append([(x - mu) / (batch_std + eps) for x in row])
        else:
            out.append([x - mu for x in row])
    return out


def _clip(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    if lo is not None:
        x = torch.maximum(x, torch.full_like(x, 1.0 - lo))
    if hi is not None:
        x = torch.minimum(x, torch.full_like(x, 1.0 + hi))
    return x


def _kl(lp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    log_rho = ref - lp  # log(pi_ref / pi)
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    return torch.exp(log_rho) - log_rho - 1.0


def ref_token_losses(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    method: str,
    lo: float | None,
    hi: float | None,
    tau_pos: float,
    tau_neg: float,
) -> list[torch.Tensor]:
    """Per-token losses (negative objective) of one sequence's unmasked tokens."""
    out = []
    if method == "gspo":
        s = torch.exp((lp - old).mean())
        a = adv[0]
        obj = torch.minimum(s * a, _clip(s, lo, hi) * a)
        return [-obj for _ in range(lp.numel())]
    if method == "gspo_token":
        s = torch.exp((lp - old).mean())
    for t in range(lp.numel()):
        a = adv[t]
        r = torch.exp(lp[t] - old[t])
        if method in ("grpo", "dr_grpo", "dapo"):
            obj = torch.minimum(r * a, _clip(r, lo, hi) * a)
        elif method == "gspo_token":
            st = s.detach() * lp[t].exp() / lp[t].detach().exp()
            obj = torch.minimum(st * a, _clip(st, lo, hi) * a)
        elif method == "sapo":
            tau = tau_pos if float(a) > 0 else tau_neg
            obj = (4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) * a
        elif method == "cispo":
            obj = _clip(r, lo, hi).detach() * a * lp[t]
        else:
            raise ValueError(method)
        out.append(-obj)
    return out


def ref_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    method: str,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str | None = None,
) -> torch.Tensor:
    """Loss from the formulas, float64, differentiable w.r.t. ``logprobs`` (a float64 leaf)."""
    lo_d, hi_d, agg_d = DEFAULTS[method]
    lo = lo_d if clip_low is None else clip_low
    hi = hi_d if clip_high is None else clip_high
    agg = agg_d if aggregation is None else aggregation
    b, t_len = logprobs.shape
    old = old_logprobs.double()
    seq_losses: list[list[torch.Tensor]] = []
    for i in range(b):
        idx = [t for t in range(t_len) if bool(mask[i, t])]
        if not idx:
            seq_losses.append([])
            continue
        sel = torch.tensor(idx)
        lp_i, old_i = logprobs[i, sel], old[i, sel]
        adv_i = advantages[i, sel].double() if advantages.dim() == 2 else advantages[i].double().expand(len(idx))
        losses = ref_token_losses(lp_i, old_i, adv_i, method, lo, hi, tau_pos, tau_neg)
        if ref_logprobs is not None and kl_coef != 0.0:
            kl = _kl(lp_i, ref_logprobs[i, sel].double(), kl_estimator)
            losses = [l + kl_coef * kl[t] for t, l in enumerate(losses)]
        seq_losses.append(losses)
    total = sum((l for ls in seq_losses for l in ls), torch.zeros((), dtype=torch.float64))
    n_tokens = sum(len(ls) for ls in seq_losses)
    if agg == "token_mean":
        return total / max(n_tokens, 1)
    if agg == "const":
        return total / (b * (t_len if max_tokens is None else max_tokens))
    per_seq = [sum(ls, torch.zeros((), dtype=torch.float64)) / len(ls) for ls in seq_losses if ls]
    return sum(per_seq, torch.zeros((), dtype=torch.float64)) / max(len(per_seq), 1)


def ref_clip_fractions(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lo: float,
    hi: float,
) -> tuple[float, float]:
    """Token-level PPO clip fractions: the share of unmasked tokens whose gradient the floor / cap cut."""
    low = high = n = 0
    for i in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not bool(mask[i, t]):
                continue
            n += 1
            r = math.exp(float(logprobs[i, t]) - float(old_logprobs[i, t]))
            a = float(advantages[i, t] if advantages.dim() == 2 else advantages[i])
            low += int(r < 1 - lo and a < 0)
            high += int(r > 1 + hi and a > 0)
    return low / max(n, 1), high / max(n, 1)


def ref_gspo_vectorised(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> torch.Tensor:
    """GSPO (mean over non-empty sequences) in float64 with autograd, for inputs too long for the loops above.

    ``logprobs`` must be a float64 leaf; masked positions may hold anything.
    """
    lr = torch.where(mask, logprobs - old_logprobs.double(), torch.zeros((), dtype=torch.float64))
    n = mask.sum(dim=1)
    keep = n > 0
    s = torch.exp(lr.sum(dim=1)[keep] / n[keep])
    a = advantages.double()[keep]
    obj = torch.minimum(s * a, torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high) * a)
    return -obj.mean()


def ref_cispo_vectorised(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float | None = None,
    clip_high: float | None = 0.28,
) -> torch.Tensor:
    """CISPO (TOKEN-MEAN) in float64 with autograd, for inputs too long for the loops above."""
    zero = torch.zeros((), dtype=torch.float64)
    lr = torch.where(mask, logprobs - old_logprobs.double(), zero)
    w = _clip(torch.exp(lr), clip_low, clip_high).detach()
    a = advantages.double() if advantages.dim() == 2 else advantages.double()[:, None].expand_as(lr)
    per_tok = torch.where(mask, -w * torch.where(mask, a, zero) * torch.where(mask, logprobs, zero), zero)
    return per_tok.sum() / mask.sum().clamp(min=1)
