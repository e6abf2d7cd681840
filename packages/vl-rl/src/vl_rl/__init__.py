"""vl-rl: reinforcement learning for VLMs, as small pure functions other projects can import.

- ``group_advantages``: group-normalised advantages (GRPO, batch-scaled, Dr. GRPO).
- ``policy_loss``: GRPO, Dr. GRPO, DAPO, GSPO, GSPO-token, SAPO and CISPO objectives with their
  papers' aggregations, clipping, KL estimators (k1/k2/k3) and metrics.
- ``vl_rl.rewards``: answer extraction and verifiers (math, choice, count, grounding, OCR,
  timestamps, chart), penalties (format, repetition, code-switching, DAPO overlong), tool-calling
  and judge rewards, composition with timeouts.

- ``vl_rl.curriculum`` / ``vl_rl.sampling``: pass-rate filtering, RLCS difficulty tiers, DAPO dynamic
  sampling with GLM's EMA expansion ratio, mixed-task batches with fixed ratios.

- ``HFRolloutEngine`` / ``Rollout``: batched multimodal rollouts with Hugging Face ``generate`` (KV cache,
  force-answer on truncation); ``vl_rl.tools.ToolRolloutEngine`` for "thinking with images" (crop/zoom
  tool outputs fed back as images, masked out of the loss); ``vl_rl.vllm_engine`` for vLLM.
- ``RLTrainer`` / ``RLConfig``: rollout, rewards, advantages, several mini-batch updates against the
  rollout's log-probs; the pass-rate pre-filter, mixed-task ratios, RLCS tiers and the expansion ratio as
  config keys (``PromptPool``, ``prefilter_prompts``); checkpoints, resume, JSONL/TensorBoard metrics, a
  reward-curve PNG. ``evaluate`` scores a model on held-out samples.
- CLI ``vl-rl RECIPE`` (``run_recipe``): your prompts (``load_prompts``: JSONL, ``datasets``, synthetic) and
  your reward (``build_reward``: a verifier, ``module:callable`` or a judge, weighted terms, per task); recipes
  ``qwen3_vl_rl``, ``glm45v_rl`` and the demo's ``demo_sapo``, ``demo_gspo``.
- ``official_weights``: the policy in the official checkpoint layout, what the vLLM engine loads.

The core needs only torch; rollouts and the trainer run models built by ``vl-rl[train]`` (vl-model, vl-train).
"""

from . import rewards
from .advantages import group_advantages
from .curriculum import FilterResult, RLCSCurriculum, filter_dataset, pass_rate_filter, pass_rates_from_rewards
from .evaluate import EvalResult, evaluate
from .losses import METHOD_DEFAULTS, PolicyMethod, aggregate, kl_estimate, policy_loss
from .rollout import HFRolloutEngine, Rollout, RolloutEngine, rollout_logprobs
from .sampling import DynamicSampler, ExpansionRatio, FillResult, MixedTaskBatcher, filter_groups, select_balanced

__version__ = "0.2.0"

_NEEDS_TRAIN = {
    "RLConfig": ".config",
    "RLResult": ".trainer",
    "RLTrainer": ".trainer",
    "PromptPool": ".prompt_sampling",
    "PromptSampler": ".prompt_sampling",
    "PrefilterResult": ".prefilter",
    "prefilter_prompts": ".prefilter",
    "load_prompts": ".prompt_data",
    "build_reward": ".reward_spec",
    "RecipeReward": ".reward_spec",
    "run_recipe": ".cli",
    "official_weights": ".weight_sync",
}


def __getattr__(name: str) -> object:
    # The trainer and its config build on vl-train (the `train` extra): imported on first use, so the
    # core (losses, advantages, rewards) needs only torch.
    if name in _NEEDS_TRAIN:
        import importlib

        return getattr(importlib.import_module(_NEEDS_TRAIN[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHOD_DEFAULTS",
    "DynamicSampler",
    "EvalResult",
    "ExpansionRatio",
    "FillResult",
    "FilterResult",
    "HFRolloutEngine",
    "MixedTaskBatcher",
    "PolicyMethod",
    "PrefilterResult",
    "PromptPool",
    "PromptSampler",
    "RLCSCurriculum",
    "RLConfig",
    "RLResult",
    "RLTrainer",
    "RecipeReward",
    "Rollout",
    "RolloutEngine",
    "__version__",
    "aggregate",
    "build_reward",
    "evaluate",
    "filter_dataset",
    "filter_groups",
    "group_advantages",
    "kl_estimate",
    "load_prompts",
    "official_weights",
    "pass_rate_filter",
    "pass_rates_from_rewards",
    "policy_loss",
    "prefilter_prompts",
    "rewards",
    "rollout_logprobs",
    "run_recipe",
    "select_balanced",
]
