"""Per-token KL estimators between the policy and a reference policy (Schulman, "Approximating
KL divergence", 2020), as used by GRPO (arXiv 2402.03300, eq. 4).

Notation: x = log pi_ref(y_t) - log pi_theta(y_t) (the log of rho = pi_ref / pi_theta), with the
token sampled from the policy. Each estimator's expectation under pi_theta is KL(pi_theta || pi_ref)
(k1, k3: unbiased; k2: biased, low variance):

    k1 = -x                 d k1 / d log pi_theta = 1
    k2 = x^2 / 2            d k2 / d log pi_theta = -x
    k3 = e^x - x - 1        d k3 / d log pi_theta = 1 - e^x     (GRPO's choice; always >= 0)
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["KLEstimator", "kl_estimate", "kl_from_log_ratio"]

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_from_log_ratio(x: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL estimate and its derivative w.r.t. log pi_theta; both exactly 0 where masked.

    Args:
        x: ``[B, T]`` log pi_ref - log pi_theta, already 0 at masked positions (selected with
            ``where`` so that garbage there cannot leak).
        mask: ``[B, T]`` boolean loss mask.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(kl, dkl_dlogprobs)``, each ``[B, T]``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if estimator == "k1":
        return -x, mask.to(x.dtype)
    if estimator == "k2":
        return 0.5 * x * x, -x
    e = torch.exp(x)
    return e - x - 1.0, 1.0 - e


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Differentiable per-token KL estimate ``[B, T]`` (for logging or custom losses).

    Args:
        logprobs: policy log-probabilities of the sampled tokens.
        ref_logprobs: reference log-probabilities of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        The estimate, in the inputs' dtype promoted to at least float32.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    x = ref_logprobs.to(dtype) - logprobs.to(dtype)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    return torch.exp(x) - x - 1.0
