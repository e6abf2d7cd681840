"""lm_loss against a float64 full-matrix reference; global normaliser over micro-batches and gloo ranks."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _gloo_loss_worker import REDUCTIONS, make_batch

from vl_moe import MoEBalanceTracker, load_balancing_loss
from vl_train.losses import (
    check_finite_loss,
    global_loss_normalizer,
    lm_loss,
    loss_normalizer,
    moe_aux_loss,
    track_moe_routing,
)

REPO = Path(__file__).resolve().parents[2]


def _reference(h, w, labels, seg=None, reduction="sqrt", bias=None, softcap=None):
    """Float64 full [N, V] logits, per-sample Python loop over (row, segment) groups."""
    h, w = h.double(), w.double()
    logits = h @ w.T + (0 if bias is None else bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    rows = labels.reshape(-1, labels.shape[-1]) if labels.dim() > 1 else labels[None]
    logp = logp.reshape(rows.shape[0], rows.shape[1], -1)
    segs = torch.zeros_like(rows) if seg is None else seg.reshape(rows.shape)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for r in range(rows.shape[0]):
        for t in range(rows.shape[1]):
            y = int(rows[r, t])
            if y != -100:
                groups.setdefault((r, int(segs[r, t])), []).append(-logp[r, t, y])
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for losses in groups.values():
        n = len(losses)
        total = torch.stack(losses).sum()
        if reduction == "token":
            num, den = num + total, den + n
        elif reduction == "sample":
            num, den = num + total / n, den + 1
        else:
            num, den = num + total / math.sqrt(n), den + math.sqrt(n)
    return num / den if den else num


def _data(b=3, length=7, d=5, v=13, seed=0, dtype=torch.float64, packed=True):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, length), generator=gen)
    labels[torch.rand(b, length, generator=gen) < 0.35] = -100
    labels[-1] = -100  # a row (sample) without labelled tokens
    seg = torch.sort(torch.randint(0, 3, (b, length), generator=gen), dim=1).values if packed else None
    h = torch.randn(b, length, d, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=dtype, requires_grad=True)
    return h, w, bias, labels, seg


def _grads(loss, *params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("reduction", ["token", "sample", "sqrt"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_matches_float64_reference(reduction, packed, chunk):
    h, w, _, labels, seg = _data(packed=packed)
    out = lm_loss(h, w, labels, segment_ids=seg, reduction=reduction, chunk_size=chunk)
    ref = _reference(h, w, labels, seg, reduction)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out.loss, h, w), _grads(ref, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bias_softcap_flat_input_and_float32():
    h, w, bias, labels, seg = _data(b=2, length=9, v=17, seed=1)
    flat_h, flat_y, flat_s = h.reshape(-1, h.shape[-1]), labels.reshape(-1), seg.reshape(-1)
    out = lm_loss(flat_h, w, flat_y, segment_ids=flat_s, lm_head_bias=bias, logit_softcap=2.5, chunk_size=3)
    ref = _reference(flat_h, w, flat_y, flat_s, "sqrt", bias=bias, softcap=2.5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out.loss, h, w, bias), _grads(ref, h, w, bias)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    out32 = lm_loss(h32, w32, labels, segment_ids=seg, chunk_size=5)
    assert out32.loss.dtype == torch.float32
    ref = _reference(h, w, labels, seg)
    torch.testing.assert_close(out32.loss.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(out32.loss, h32, w32), _grads(ref, h, w)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_gradcheck_tiny():
    h, w, bias, labels, seg = _data(b=2, length=4, d=3, v=5, seed=2)
    fn = lambda h, w, b: lm_loss(h, w, labels, segment_ids=seg, lm_head_bias=b, logit_softcap=3.0, chunk_size=2).loss
    assert torch.autograd.gradcheck(fn, (h, w, bias))


def test_stats_and_normalizer_values():
    labels = torch.tensor([[5, 5, -100, 5, 5, 5], [-100, -100, -100, 5, -100, -100]])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])  # samples: 2, 3, (0), 1, (0) tokens
    assert float(loss_normalizer(labels, seg, "token")) == 6
    assert float(loss_normalizer(labels, seg, "sample")) == 3
    assert float(loss_normalizer(labels, seg, "sqrt")) == pytest.approx(math.sqrt(2) + math.sqrt(3) + 1)
    assert float(loss_normalizer(labels, None, "sample")) == 2
    assert float(loss_normalizer(labels != -100, seg, "sqrt")) == pytest.approx(math.sqrt(2) + math.sqrt(3) + 1)
    out = lm_loss(torch.randn(2, 6, 4), torch.randn(7, 4), labels, segment_ids=seg, reduction="sample")
    assert out.sample_tokens.tolist() == [2.0, 3.0, 1.0]
    assert float(out.num_tokens) == 6 and float(out.num_samples) == 3
    torch.testing.assert_close(out.loss, out.per_sample.mean())


def test_packed_equals_unpacked():
    h, w, _, labels, _ = _data(b=4, length=5, seed=3, packed=False)
    labels[-1, 0] = 2  # every row has a labelled token
    packed = lm_loss(
        h.reshape(1, 20, -1), w, labels.reshape(1, 20), segment_ids=torch.arange(4).repeat_interleave(5)[None]
    )
    unpacked = lm_loss(h, w, labels)
    torch.testing.assert_close(packed.loss, unpacked.loss)


def test_no_labels_gives_zero_loss_and_zero_grads():
    h, w, _, labels, seg = _data()
    out = lm_loss(h, w, torch.full_like(labels, -100), segment_ids=seg)
    assert float(out.loss.detach()) == 0.0 and float(out.num_samples) == 0
    gh, gw = _grads(out.loss, h, w)
    assert not gh.any() and not gw.any()


@pytest.mark.parametrize("reduction", ["token", "sample", "sqrt"])
def test_gradient_accumulation_equals_one_batch(reduction):
    h, w, _, labels, seg = _data(b=6, length=8, seed=4)
    big = lm_loss(h, w, labels, segment_ids=seg, reduction=reduction)
    micro = [(0, 1), (1, 4), (4, 6)]
    z = global_loss_normalizer([loss_normalizer(labels[a:b], seg[a:b], reduction) for a, b in micro])
    total = sum(
        lm_loss(h[a:b], w, labels[a:b], segment_ids=seg[a:b], reduction=reduction, normalizer=z, chunk_size=3).loss
        for a, b in micro
    )
    torch.testing.assert_close(total, big.loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(total, h, w), _grads(big.loss, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_two_gloo_ranks_equal_one_batch(tmp_path):
    worker = Path(__file__).with_name("_gloo_loss_worker.py")
    out_file, init_file = tmp_path / "grads.pt", tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), "2", str(init_file), str(out_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = torch.load(out_file)
    batch = make_batch()
    for reduction in REDUCTIONS:
        h, w = batch["hidden"].requires_grad_(True), batch["weight"].requires_grad_(True)
        big = lm_loss(h, w, batch["labels"], segment_ids=batch["segment_ids"], reduction=reduction)
        gh, gw = _grads(big.loss, h, w)
        want = torch.cat([gh.reshape(-1), gw.reshape(-1), big.loss.detach().reshape(1)])
        torch.testing.assert_close(results[reduction], want, rtol=1e-10, atol=1e-12)
        h.requires_grad_(False)
        w.requires_grad_(False)


def _peak_tensor_mb():
    spec = importlib.util.spec_from_file_location("_bench_memory", REPO / "benchmarks" / "_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_tensor_mb


def test_peak_memory_is_bounded_by_the_chunk():
    peak_tensor_mb = _peak_tensor_mb()
    n, d, v, chunk = 1024, 16, 2048, 32
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(n, d, generator=gen, requires_grad=True)
    w = torch.randn(v, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=gen)

    def chunked():
        lm_loss(h, w, labels, reduction="token", chunk_size=chunk).loss.backward()

    def full():
        torch.nn.functional.cross_entropy(h @ w.T, labels).backward()

    full_logits_mb = n * v * 4 / 2**20  # 8 MB
    chunk_mb = chunk * v * 4 / 2**20  # 0.25 MB
    params_mb = (h.numel() + w.numel()) * 4 / 2**20  # gradients of the inputs
    peak_chunked, peak_full = peak_tensor_mb(chunked), peak_tensor_mb(full)
    assert peak_full > full_logits_mb
    assert peak_chunked < 6 * chunk_mb + 2 * params_mb < full_logits_mb / 2, (peak_chunked, peak_full)


def test_bad_inputs():
    h, w, _, labels, seg = _data()
    with pytest.raises(ValueError, match=r"labels must be in \[0, V=13\)"):
        lm_loss(h, w, labels.clamp_min(0) + 13)
    with pytest.raises(ValueError, match="leading shape"):
        lm_loss(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="share D"):
        lm_loss(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="segment_ids shape"):
        lm_loss(h, w, labels, segment_ids=seg[:, :-1])
    with pytest.raises(ValueError, match="reduction must be one of"):
        lm_loss(h, w, labels, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        lm_loss(h, w, labels, chunk_size=0)


def test_check_finite_loss():
    assert check_finite_loss(torch.tensor(1.5))
    assert not check_finite_loss(torch.tensor(float("nan")))
    assert not check_finite_loss(torch.tensor([1.0, float("inf")]))


def test_moe_aux_loss_local_and_global_batch():
    gen = torch.Generator().manual_seed(6)
    logits = [torch.randn(2, 5, 6, generator=gen, requires_grad=True) for _ in range(2)]
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    local = moe_aux_loss(logits, mask, top_k=2, coef=0.1)
    torch.testing.assert_close(local, 0.1 * load_balancing_loss(logits, 2, attention_mask=mask))
    # Global batch: two micro-batches (rows), shares summed == the loss of the whole batch.
    tracker = MoEBalanceTracker(6, 2, num_layers=2)
    for r in range(2):
        track_moe_routing(tracker, [x[r] for x in logits], mask[r])
    total = sum(moe_aux_loss([x[r] for x in logits], mask[r], 2, tracker=tracker, coef=0.1) for r in range(2))
    want = 0.1 * load_balancing_loss(logits, 2, attention_mask=mask)
    torch.testing.assert_close(total, want)
    for got, ref in zip(_grads(total, *logits), _grads(want, *logits)):
        torch.testing.assert_close(got, ref)
