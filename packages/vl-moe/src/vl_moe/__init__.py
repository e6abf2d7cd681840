"""vl-moe: the sparse mixture-of-experts layer of Qwen3-VL-MoE, installable alone.

- ``route``, ``TopKRouter``: fp32 softmax top-k routing with renormalised weights and deterministic ties.
- ``load_balancing_loss``, ``router_z_loss``, ``MoEBalanceTracker``: Switch-style balance loss (padding
  aware, global-batch balancing across micro-batches and ranks) and the ST-MoE z-loss.
- ``moe_experts``: the routed SwiGLU experts for any router; ``backend="torch"`` (sorted grouped
  matmuls, any device) or ``"triton"`` (the kernels in ``vl_moe.kernels``, loaded on first use).
- ``SparseMoeBlock``: router plus experts with the state-dict keys of transformers' Qwen3-VL-MoE block.
- ``shard_experts``, ``ExpertParallelExperts``: expert parallelism (experts sharded over ranks, tokens
  dispatched and combined by all-to-all).
"""

from .balance import MoEBalanceTracker
from .block import MoEExperts, MoEOutput, SparseMoeBlock
from .expert_parallel import ExpertParallelExperts, shard_experts
from .functional import BACKENDS, Backend, moe_experts, resolve_backend
from .losses import expert_counts, load_balancing_loss, router_z_loss
from .reference import moe_experts_reference
from .router import TopKRouter, route, router_probs
from .torch_experts import torch_moe_experts

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "Backend",
    "ExpertParallelExperts",
    "MoEBalanceTracker",
    "MoEExperts",
    "MoEOutput",
    "SparseMoeBlock",
    "TopKRouter",
    "__version__",
    "expert_counts",
    "load_balancing_loss",
    "moe_experts",
    "moe_experts_reference",
    "resolve_backend",
    "route",
    "router_probs",
    "router_z_loss",
    "shard_experts",
    "torch_moe_experts",
]
