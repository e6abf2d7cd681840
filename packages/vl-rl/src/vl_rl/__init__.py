"""vl-rl: reinforcement learning for VLMs, as small pure functions other projects can import.

- ``group_advantages``: group-normalised advantages (GRPO, batch-scaled, Dr. GRPO).
- ``policy_loss``: GRPO, Dr. GRPO, DAPO, GSPO, GSPO-token, SAPO and CISPO objectives with their
  papers' aggregations, clipping, KL estimators (k1/k2/k3) and metrics.
- ``vl_rl.rewards``: answer extraction and verifiers (math, choice, count, grounding, OCR,
  timestamps, chart), penalties (format, repetition, code-switching, DAPO overlong), tool-calling
  and judge rewards, composition with timeouts.

- ``vl_rl.curriculum`` / ``vl_rl.sampling``: pass-rate filtering, RLCS difficulty tiers, DAPO dynamic
  sampling with GLM's EMA expansion ratio, mixed-task batches with fixed ratios.

The core needs only torch. Rollouts and the RL trainer are not written yet.
"""

from . import rewards
from .advantages import group_advantages
from .curriculum import FilterResult, RLCSCurriculum, filter_dataset, pass_rate_filter, pass_rates_from_rewards
from .losses import METHOD_DEFAULTS, PolicyMethod, aggregate, kl_estimate, policy_loss
from .sampling import DynamicSampler, ExpansionRatio, FillResult, MixedTaskBatcher, filter_groups, select_balanced

__version__ = "0.1.0"

__all__ = [
    "METHOD_DEFAULTS",
    "DynamicSampler",
    "ExpansionRatio",
    "FillResult",
    "FilterResult",
    "MixedTaskBatcher",
    "PolicyMethod",
    "RLCSCurriculum",
    "__version__",
    "aggregate",
    "filter_dataset",
    "filter_groups",
    "group_advantages",
    "kl_estimate",
    "pass_rate_filter",
    "pass_rates_from_rewards",
    "policy_loss",
    "rewards",
    "select_balanced",
]
