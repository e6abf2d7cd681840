"""vl-rl: reinforcement learning for VLMs, as small pure functions other projects can import.

- ``group_advantages``: group-normalised advantages (GRPO, batch-scaled, Dr. GRPO).
- ``policy_loss``: GRPO, Dr. GRPO, DAPO, GSPO, GSPO-token, SAPO and CISPO objectives with their
  papers' aggregations, clipping, KL estimators (k1/k2/k3) and metrics.
- ``vl_rl.rewards``: answer extraction and verifiers (math, choice, count, grounding, OCR,
  timestamps, chart), penalties (format, repetition, code-switching, DAPO overlong), tool-calling
  and judge rewards, composition with timeouts.

The core needs only torch. Curriculum sampling, rollouts and the RL trainer are not written yet.
"""

from . import rewards
from .advantages import group_advantages
from .losses import METHOD_DEFAULTS, PolicyMethod, aggregate, kl_estimate, policy_loss

__version__ = "0.1.0"

__all__ = [
    "METHOD_DEFAULTS",
    "PolicyMethod",
    "__version__",
    "aggregate",
    "group_advantages",
    "kl_estimate",
    "policy_loss",
    "rewards",
]
