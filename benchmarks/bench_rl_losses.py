"""Question: is vl_rl.losses.policy_loss (forward + backward) at least as fast as the same formula
written naively in torch with autograd?

Case from issue 7: [256, 8192] tokens (quick: [64, 2048]), float32 log-probs, per-sequence
advantages, ~25% right padding. Two baselines: the naive formula given the same boolean mask,
and given a float mask converted outside the timing (the stricter one). The naive side is the
textbook formula (mask by multiplication, autograd through exp/clamp/min) and computes only the
loss, and only the terms its method needs (GSPO never forms the per-token ratio); ours also
validates the inputs (one host sync), tolerates NaN at masked positions and returns the metrics
(clip fractions, mean ratio). Values and gradients are
checked equal before timing. One extra row times bf16 log-probs for GRPO.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare

METHODS = ["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "cispo"]


def naive_loss(method: str, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The formulas of REFERENCE.md section 5, written the obvious way."""
    lp, old = lp.float(), old.float()
    a = adv[:, None]
    n = mask.sum(-1).clamp(min=1)
    seq_mean = lambda x: ((x * mask).sum(-1) / n).mean()
    token_mean = lambda x: (x * mask).sum() / mask.sum()
    if method in ("gspo", "gspo_token"):
        s = torch.exp(((lp - old) * mask).sum(-1) / n)
        if method == "gspo":
            return -torch.min(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv).mean()
        st = s.detach()[:, None] * torch.exp(lp - lp.detach())
        return seq_mean(-torch.min(st * a, st.clamp(1 - 3e-4, 1 + 4e-4) * a))
    ratio = torch.exp(lp - old)
    if method in ("grpo", "dr_grpo", "dapo"):
        lo, hi = (0.2, 0.28) if method == "dapo" else (0.2, 0.2)
        per_tok = -torch.min(ratio * a, ratio.clamp(1 - lo, 1 + hi) * a)
        if method == "grpo":
            return seq_mean(per_tok)
        if method == "dapo":
            return token_mean(per_tok)
        return (per_tok * mask).sum() / (lp.shape[0] * lp.shape[1])
    if method == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05)
        return seq_mean(-(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * a)
    return token_mean(-ratio.clamp(max=1.28).detach() * a * lp)


def _inputs(b: int, t: int, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    lp = -3 * torch.rand(b, t, generator=gen)
    old = lp + 0.05 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return tuple(x.to(device) for x in (lp, old, adv, mask))


def run(quick: bool) -> list[Row]:
    from vl_rl.losses import policy_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, t = (64, 2048) if quick else (256, 8192)
    lp, old, adv, mask = _inputs(b, t, device)
    mask_f = mask.float()
    rows = []
    cases = [(m, torch.float32) for m in METHODS] + [("grpo", torch.bfloat16)]
    for method, dtype in cases:
        leaf = lp.to(dtype).requires_grad_(True)
        old_d = old.to(dtype)

        def ours(method: str = method, leaf: torch.Tensor = leaf, old_d: torch.Tensor = old_d) -> torch.Tensor:
            loss, _ = policy_loss(leaf, old_d, adv, mask, method=method)  # type: ignore[arg-type]
            return torch.autograd.grad(loss, leaf)[0]

        # Two baselines: given the same bool mask, and given a float mask converted outside the timing.
        for baseline, m in (("naive torch, same bool mask", mask), ("naive torch, float mask (untimed)", mask_f)):

            def naive(
                method: str = method, leaf: torch.Tensor = leaf, old_d: torch.Tensor = old_d, m: torch.Tensor = m
            ) -> torch.Tensor:
                return torch.autograd.grad(naive_loss(method, leaf, old_d, adv, m), leaf)[0]

            torch.testing.assert_close(ours().float(), naive().float(), rtol=1e-3, atol=1e-9)
            rows.append(
                compare(
                    "RL policy loss fwd+bwd",
                    f"{method}, [{b}, {t}] {str(dtype).removeprefix('torch.')}",
                    baseline=baseline,
                    baseline_fn=naive,
                    ours_fn=ours,
                    device=device,
                    repeat=5 if quick else 9,
                    note="ours also validates inputs and returns metrics",
                )
            )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case} vs {row.baseline}: {row.baseline_ms:.2f} ms vs {row.ours_ms:.2f} ms = {row.speedup:.2f}x")
