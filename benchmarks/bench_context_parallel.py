"""Question: how much memory per rank does context parallelism save on a 32K-token packed row?

One packed row of 32K tokens (4K in the quick run) of 1K-token samples separated by ``segment_ids``,
one 224 px image per sample, SFT-style labels on the last 1/16 of every sample, trained for one step by
``vl_train.Trainer`` with ``activation_checkpointing=True`` and ``loss_chunk_size=256`` on ``C`` = 1, 2
and 4 ranks with ``[train] context_parallel = C`` (Ulysses all-to-all over heads, the tower
data-parallel across the CP group, FSDP2 over the ``C`` ranks). The model: a ``qwen3_vl`` config with
text hidden 256, 4 layers, 4 heads (2 KV heads: repeated for ``C = 4``), head_dim 64, intermediate 768,
the real 151936 vocabulary; vision depth 1, width 64; random init with a fixed seed on every rank, float32.

Each side is launched as its own ``torchrun``-style group of ``C`` processes (gloo on CPU, NCCL with one
GPU per rank on CUDA; CUDA needs 4 GPUs). Each rank measures the peak memory of its step: on CUDA
``torch.cuda.max_memory_allocated`` after a reset (everything: parameters, gathered shards, activations),
on CPU the peak of live tensor storage allocated during the step (``benchmarks/_memory.py``). The first-step
losses are checked equal across ``C``. Rows: ``C = 2`` and ``C = 4`` against ``C = 1``; the ratio is the step
time (on a shared CPU it means little), the note carries the peak per rank of each side, side by side, and
``vl_train.plan``'s estimate of what the step allocates per rank (activations and the parameters FSDP2
gathers; the parameters' gradients, unsharded in backward, are not in it).

Both sides use SDPA (FlashAttention where CUDA has it), which attends within each packed sample's span:
no ``[L, L]`` mask on any rank (vl-model built a dense 1 GiB boolean one at 32K before 0.2.0, a floor
that CP did not divide and that made 4 ranks of 32K exceed a 24 GiB machine). Not divided by ``C``
either: the loss chunk (``2 x 256 x 151936`` fp32 logits and gradient, about 300 MB) and, on CPU, the
AdamW state created in the step (divided by ``C`` under FSDP2). The 32K run takes minutes on CPU and
its times are only meaningful on an idle machine: the lead runs it quietly
(``python benchmarks/bench_context_parallel.py`` launches the ranks itself; on CUDA it needs 4 GPUs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row

BENCH = "Context parallelism (peak memory per rank)"
VOCAB = 151936
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653
PATCH, MERGE = 16, 2
PATCH_DIM = 3 * 2 * PATCH * PATCH
GRID = [1, 224 // PATCH, 224 // PATCH]  # 196 patches, 49 merged tokens
IMAGE_TOKENS = GRID[0] * GRID[1] * GRID[2] // MERGE**2
SAMPLE, CHUNK = 1024, 256
SIZES = (1, 2, 4)

CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl",
    "image_token_id": IMAGE,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
    "tie_word_embeddings": False,
    "text_config": {
        "vocab_size": VOCAB,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 65536,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [16, 8, 8]},
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_heads": 2,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": MERGE,
        "out_hidden_size": 256,
        "deepstack_visual_indexes": [0],
    },
}


def packed_row(length: int) -> dict[str, torch.Tensor]:
    """One row of ``length // SAMPLE`` packed samples, each with one 224 px image; labels on each sample's tail."""
    g = torch.Generator().manual_seed(2)
    ids: list[int] = []
    for _ in range(length // SAMPLE):
        head = torch.randint(0, 150000, (16,), generator=g).tolist()
        tail = torch.randint(0, 150000, (SAMPLE - 18 - IMAGE_TOKENS,), generator=g).tolist()
        ids += head + [VISION_START] + [IMAGE] * IMAGE_TOKENS + [VISION_END] + tail
    input_ids = torch.tensor([ids])
    samples = length // SAMPLE
    grid = torch.tensor([GRID] * samples)
    labels = input_ids.masked_fill((input_ids == IMAGE) | (input_ids == VISION_START) | (input_ids == VISION_END), -100)
    answer = torch.arange(length) % SAMPLE >= SAMPLE - SAMPLE // 16
    return {
        "input_ids": input_ids,
        "labels": labels.masked_fill(~answer[None], -100),
        "attention_mask": torch.ones_like(input_ids),
        "segment_ids": torch.arange(samples).repeat_interleave(SAMPLE)[None],
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


def _worker(out: str, length: int, size: int) -> None:
    """One rank: one checkpointed training step with CP ``size``; rank 0 writes the ranks' peaks."""
    from benchmarks._memory import peak_tensor_mb
    from vl_model import VLConfig, VLForConditionalGeneration
    from vl_train.config import TrainConfig
    from vl_train.parallel import init_distributed, is_main_process
    from vl_train.trainer import Trainer

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    distributed = init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    attention = "flash_attention_2" if cuda and _has_flash() else "sdpa"
    model = VLForConditionalGeneration(VLConfig.from_qwen3_vl(CONFIG, attn_implementation=attention)).to(device)
    cfg = TrainConfig(
        max_steps=1,
        context_parallel=size,
        activation_checkpointing=True,
        loss_chunk_size=CHUNK,
        loss_reduction="token",
        optim={"lr": 1e-4, "max_grad_norm": None},
        bf16=cuda,
        output_dir=str(Path(out) / f"run-cp{size}"),
        tensorboard=False,
        plot=False,
        progress=False,
    )
    trainer = Trainer(model, cfg, iter([packed_row(length)]))
    record: dict[str, Any] = {}
    start = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        record.update(trainer.train_step())
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_tensor_mb(lambda: record.update(trainer.train_step()))
    ms = (time.perf_counter() - start) * 1e3
    peaks = [peak]
    if distributed:
        peaks = [0.0] * size
        torch.distributed.all_gather_object(peaks, peak)
    if is_main_process():
        result = {"loss": float(record["loss"]), "ms": ms, "peaks_mb": peaks, "attention": attention}
        (Path(out) / f"cp{size}.json").write_text(json.dumps(result))
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _launch(out: Path, length: int, size: int) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(out), str(length), str(size)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(size)
    ]
    logs = [p.communicate()[0].decode() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"CP {size} failed:\n" + "\n".join(logs))
    return dict(json.loads((out / f"cp{size}.json").read_text()))


def _planned(length: int, size: int) -> float:
    from vl_train.plan import plan_memory

    wide = 2 if torch.cuda.is_available() else 4
    plan = plan_memory(
        CONFIG,
        tokens=length,
        world_size=size,
        context_parallel=size,
        chunk_size=CHUNK,
        activation_bytes=wide,
        param_bytes=wide,
        labelled=length // 16,
    )
    return (plan.activations + plan.gathered) / 2**20


def run(quick: bool) -> list[Row]:
    length = 4096 if quick else 32768
    if torch.cuda.is_available() and torch.cuda.device_count() < max(SIZES):
        print(f"bench_context_parallel: needs {max(SIZES)} GPUs for CP {max(SIZES)}; skipped")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        results = {size: _launch(Path(tmp), length, size) for size in SIZES}
    base = results[1]
    for size, result in results.items():
        if abs(result["loss"] - base["loss"]) > 1e-4 * abs(base["loss"]):
            raise AssertionError(f"CP {size} first-step loss {result['loss']!r} differs from CP 1's {base['loss']!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    side = ", ".join(f"CP {s}: {max(r['peaks_mb']):.0f} MB" for s, r in results.items())
    plan = ", ".join(f"CP {s}: {_planned(length, s):.0f} MB" for s in SIZES)
    rows = []
    for size in SIZES[1:]:
        case = (
            f"one step of 1 packed row x {length} tokens ({length // SAMPLE} samples, one 224 px image each), "
            f"hidden 256 x 4 layers, vocab 151936, checkpointing + loss chunk {CHUNK}: CP {size} vs CP 1"
        )
        note = (
            f"peak memory per rank: {side}; planned activations + FSDP-gathered parameters per rank: {plan}; attention "
            f"{base['attention']}; first-step loss {base['loss']:.4f} on every side"
            + ("; quick: 4K tokens (the full run: 32K)" if quick else "")
        )
        rows.append(Row(BENCH, case, "CP 1 (one rank)", base["ms"], results[size]["ms"], device, note))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        sys.stdout.flush()
        os._exit(0)
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x ({row.note})")
