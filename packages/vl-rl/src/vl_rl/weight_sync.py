"""The policy's weights as an inference engine loads them: the official Qwen3-VL checkpoint layout.

vLLM's Qwen3-VL models take weights through ``model.load_weights(iterable of (name, tensor))`` with the
names and shapes of the Hub checkpoints (the files ``export_qwen3_vl`` writes): ``model.visual.*``,
``model.language_model.*``, ``lm_head.weight`` (left out when tied to the embeddings), and for MoE
models the expert tensors in the Hub's transposed layout (``experts.gate_up_proj [E, H, 2I]``,
``experts.down_proj [E, I, H]``; in memory they are ``[E, 2I, H]`` / ``[E, H, I]``). :func:`official_weights`
yields exactly those pairs, one tensor at a time, gathering FSDP-sharded tensors (a collective: call it on
every rank). Other models (a composed VLM) are yielded under their own state-dict names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["official_weights"]

_EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def official_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``model`` in the official Qwen3-VL checkpoint layout (see the module docstring).

    Tensors are detached full tensors on the model's device (an FSDP shard is gathered first).
    """
    config = getattr(model, "config", None)
    official = hasattr(config, "to_qwen3_vl_dict")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if official and name == "lm_head.weight" and tied:
            continue
        if official and name.endswith(_EXPERT_SUFFIXES) and full.shape != full.transpose(1, 2).shape:
            full = full.transpose(1, 2)
        yield name, full.detach()
