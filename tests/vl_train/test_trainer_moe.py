"""Global-batch MoE balancing in the ``Trainer``: A micro-batches give the one-big-batch balance loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _trainer_helpers import SyntheticBatches, concat_batches, quiet, tiny_model

from vl_moe import load_balancing_loss
from vl_train.config import TrainConfig
from vl_train.losses import lm_loss
from vl_train.trainer import MODEL_INPUTS, Trainer, shift_labels

COEF, TOP_K = 0.5, 2


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    source = SyntheticBatches(seed=11, rows=2, length=16)
    return [source.batch(i) for i in range(2)]


def _accumulate(
    tmp_path: Path, micro: list[dict[str, torch.Tensor]], global_balance: bool
) -> tuple[float, float, dict]:
    model = tiny_model(moe=True, aux_coef=COEF)
    cfg = TrainConfig(
        **quiet(
            grad_accum_steps=len(micro),
            global_batch_balance=global_balance,
            output_dir=str(tmp_path / f"run-{global_balance}-{len(micro)}"),
        )
    )
    trainer = Trainer(model, cfg, iter(micro))
    total, aux = trainer.accumulate(micro)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total), float(aux), grads


def _one_big_batch(micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, dict]:
    model = tiny_model(moe=True)
    big = concat_batches(micro)
    inputs = {k: v for k, v in big.items() if k in MODEL_INPUTS}
    out = model.model(**inputs, use_cache=False, output_router_logits=True)
    lm = lm_loss(out.last_hidden_state, model.lm_head.weight, shift_labels(big["labels"]), reduction="sqrt").loss
    aux = COEF * load_balancing_loss(list(out.router_logits), TOP_K, attention_mask=big["attention_mask"])
    (lm + aux).backward()
    return (
        float(lm.detach()),
        float(aux.detach()),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


def test_global_balance_over_micro_batches_equals_one_big_batch(tmp_path: Path) -> None:
    micro = _micro_batches()
    want_lm, want_aux, want_grads = _one_big_batch(micro)
    lm, aux, grads = _accumulate(tmp_path, micro, global_balance=True)
    assert lm == pytest.approx(want_lm, rel=1e-5)
    assert aux == pytest.approx(want_aux, rel=1e-5)
    assert set(grads) == set(want_grads)
    router = [n for n in grads if "gate" in n and "experts" not in n]
    assert router, "no router weights among the gradients"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # the per-micro-batch variant is a different loss: its f are each micro-batch's own
    _, micro_aux, micro_grads = _accumulate(tmp_path, micro, global_balance=False)
    assert abs(micro_aux - want_aux) > 1e-4
    assert any(not torch.allclose(micro_grads[n], want_grads[n], rtol=1e-4, atol=1e-6) for n in router)


def test_global_balance_with_one_micro_batch_needs_no_routing_pass(tmp_path: Path) -> None:
    micro = _micro_batches()[:1]
    _, want_aux, _ = _one_big_batch(micro)
    _, global_aux, _ = _accumulate(tmp_path, micro, global_balance=True)
    _, local_aux, _ = _accumulate(tmp_path, micro, global_balance=False)
    assert global_aux == pytest.approx(want_aux, rel=1e-6)
    assert local_aux == pytest.approx(want_aux, rel=1e-6)


def test_global_balance_trains_and_logs_the_aux_loss(tmp_path: Path) -> None:
    cfg = TrainConfig(**quiet(max_steps=2, grad_accum_steps=2, output_dir=str(tmp_path)))
    result = Trainer(tiny_model(moe=True, aux_coef=0.01), cfg, SyntheticBatches(seed=2)).train()
    assert result.skipped_steps == 0
    assert all(r["moe_aux_loss"] > 0 for r in result.records)
