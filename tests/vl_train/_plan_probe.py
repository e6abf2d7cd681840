"""Measure the peak memory of small CPU training steps (a script, run in a fresh process per measurement).

Usage: ``python _plan_probe.py TOKENS CHECKPOINTING`` prints ``{"measured": bytes, "planned": bytes}`` as JSON:
the process's peak resident memory over two steps (forward, chunked loss, backward, AdamW) minus its
resident memory before the model existed, and ``vl_train.plan.plan_memory`` for the same step (fp32).
Large allocations are mmap-ed (``MALLOC_MMAP_THRESHOLD_``, set by the test), so freed tensors leave the
resident set at once and the peak follows the live tensors.
"""

from __future__ import annotations

import json
import os
import sys

import torch

CONFIG = {
    "model_type": "qwen3_vl",
    "text_config": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 65536,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]},
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 4,
        "out_hidden_size": 256,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    },
}
CHUNK = 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    # VmHWM: the peak of this process's own address space. ru_maxrss would not do: Linux carries the
    # parent's peak over fork and exec, so under a large pytest process every probe measured its parent.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(tokens: int, checkpointing: bool) -> None:
    from vl_model import VLConfig, VLForConditionalGeneration
    from vl_train.losses import lm_loss
    from vl_train.plan import plan_memory

    torch.set_num_threads(1)
    planned = plan_memory(
        CONFIG,
        tokens=tokens,
        activation_checkpointing=checkpointing,
        activation_bytes=4,
        param_bytes=4,
        chunk_size=CHUNK,
    )
    ids = torch.randint(0, 4000, (1, tokens), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    base = _rss()
    torch.manual_seed(0)
    model = VLForConditionalGeneration(VLConfig.from_qwen3_vl(CONFIG)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        hidden = model.forward_hidden(input_ids=ids).last_hidden_state
        loss = lm_loss(hidden, model.output_weight(), targets, chunk_size=CHUNK, reduction="token").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del hidden, loss
    peak = _peak_rss()
    print(json.dumps({"measured": peak - base, "planned": planned.total, "activations": planned.activations}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1")
