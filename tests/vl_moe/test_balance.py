"""Global-batch balancing: ``MoEBalanceTracker`` over micro-batches, simulated ranks and real gloo ranks."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

from vl_moe import MoEBalanceTracker, expert_counts, load_balancing_loss, route

EXPERTS, TOP_K = 6, 2


def _batch(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, generator=gen) * 2
    return logits, route(logits, TOP_K)[1]


def test_micro_batches_equal_one_big_batch() -> None:
    parts = [_batch(t, seed) for seed, t in enumerate((5, 11, 8))]
    tracker = MoEBalanceTracker(EXPERTS, TOP_K)
    for _, ids in parts:
        tracker.add(ids)
    total = sum(logits.shape[0] for logits, _ in parts)
    # Token-weighted mean of the micro-batch losses (the usual gradient-accumulation average).
    accumulated = sum(tracker.loss(logits) * logits.shape[0] / total for logits, _ in parts)
    big_logits = torch.cat([logits for logits, _ in parts])
    big = load_balancing_loss(big_logits, TOP_K, expert_ids=torch.cat([ids for _, ids in parts]))
    torch.testing.assert_close(accumulated, big, rtol=1e-6, atol=0)
    assert float(tracker.fractions().sum()) == pytest.approx(TOP_K)


def test_global_counts_differ_from_local_ones() -> None:
    (la, ia), (_, ib) = _batch(9, 0), _batch(9, 1)
    tracker = MoEBalanceTracker(EXPERTS, TOP_K)
    tracker.add(ia)
    tracker.add(ib)
    local = load_balancing_loss(la, TOP_K, expert_ids=ia)
    assert not torch.allclose(tracker.loss(la), local)
    counts, tokens = tracker.global_counts()
    torch.testing.assert_close(counts, expert_counts(ia, EXPERTS)[0] + expert_counts(ib, EXPERTS)[0])
    assert float(tokens) == 18


def test_padding_is_excluded_from_counts() -> None:
    logits, ids = _batch(8, 3)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    tracker = MoEBalanceTracker(EXPERTS, TOP_K)
    tracker.add(ids, mask)
    counts, tokens = tracker.global_counts()
    assert float(tokens) == 5 and float(counts.sum()) == 5 * TOP_K
    want = load_balancing_loss(logits, TOP_K, expert_ids=ids, attention_mask=mask)
    torch.testing.assert_close(tracker.loss(logits, mask), want)


def test_simulated_ranks_through_the_all_reduce_hook() -> None:
    """Two 'ranks' whose hook adds the other rank's counts: both see the union of the batches."""
    (la, ia), (lb, ib) = _batch(7, 4), _batch(10, 5)
    other = {"a": expert_counts(ib, EXPERTS), "b": expert_counts(ia, EXPERTS)}

    def hook(name: str):
        def add_other(t: torch.Tensor) -> None:
            counts, tokens = other[name]
            t[0, :-1] += counts
            t[0, -1] += tokens

        return add_other

    ta = MoEBalanceTracker(EXPERTS, TOP_K, all_reduce=hook("a"))
    tb = MoEBalanceTracker(EXPERTS, TOP_K, all_reduce=hook("b"))
    ta.add(ia)
    tb.add(ib)
    torch.testing.assert_close(ta.global_counts()[0], tb.global_counts()[0])
    tokens = la.shape[0] + lb.shape[0]
    mean = (ta.loss(la) * la.shape[0] + tb.loss(lb) * lb.shape[0]) / tokens
    big = load_balancing_loss(torch.cat([la, lb]), TOP_K, expert_ids=torch.cat([ia, ib]))
    torch.testing.assert_close(mean, big, rtol=1e-6, atol=0)


WORKER = Path(__file__).resolve().parent / "_gloo_worker.py"


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_gloo_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")
def test_real_gloo_ranks_all_reduce_counts(tmp_path: Path) -> None:
    world = 2
    init = tmp_path / "init"
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(init), str(tmp_path)])
        for r in range(world)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0] * world, f"gloo ranks exited with {codes}"
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    worker = _load_worker()
    batches = [worker.batch(r) for r in range(world)]
    want_counts = sum(expert_counts(ids, EXPERTS)[0] for _, ids in batches)
    for res in results:
        torch.testing.assert_close(res["counts"], want_counts)
        assert float(res["tokens"]) == sum(logits.shape[0] for logits, _ in batches)
    tokens = sum(logits.shape[0] for logits, _ in batches)
    mean = sum(res["loss"] * logits.shape[0] / tokens for res, (logits, _) in zip(results, batches, strict=True))
    big = load_balancing_loss(
        torch.cat([lg for lg, _ in batches]), TOP_K, expert_ids=torch.cat([ids for _, ids in batches])
    )
    torch.testing.assert_close(mean, big, rtol=1e-6, atol=0)


def test_reset_and_bad_inputs() -> None:
    tracker = MoEBalanceTracker(EXPERTS, TOP_K, num_layers=2)
    with pytest.raises(ValueError, match="no counts yet"):
        tracker.global_counts()
    with pytest.raises(ValueError, match=re.escape("layer must be in [0, 2), got 2")):
        tracker.add(_batch(3, 0)[1], layer=2)
    with pytest.raises(ValueError, match="3 slots per token but the tracker's top_k is 2"):
        tracker.add(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        MoEBalanceTracker(4, 5)
    tracker.add(_batch(3, 0)[1])
    tracker.reset()
    with pytest.raises(ValueError, match="no counts yet"):
        tracker.loss(_batch(3, 0)[0])
