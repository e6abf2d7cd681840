"""Tests of the per-part AdamW groups and the warm-up + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _trainer_helpers import tiny_model

from vl_model.parts import freeze, part_parameters
from vl_train.config import OptimConfig
from vl_train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def reference_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Independent statement of the schedule: linear ramp, then half a cosine period down to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = total - warmup
    t = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return floor + (1 - floor) * (math.cos(math.pi * t) + 1) / 2


@pytest.mark.parametrize(
    ("warmup", "total", "floor"), [(0, 10, 0.1), (3, 10, 0.0), (4, 4, 0.5), (2, 7, 1.0), (5, 1, 0.2)]
)
def test_lr_factor_matches_reference(warmup: int, total: int, floor: float) -> None:
    for step in range(total + 3):
        got = lr_factor(step, warmup_steps=warmup, max_steps=total, min_lr_ratio=floor)
        assert got == pytest.approx(reference_factor(step, warmup, total, floor), abs=1e-12)


def test_schedule_shape() -> None:
    f = [lr_factor(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert f[20] == pytest.approx(0.1)


def test_lr_factor_bad_input() -> None:
    with pytest.raises(ValueError, match="step"):
        lr_factor(-1, warmup_steps=0, max_steps=3, min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_factor(0, warmup_steps=0, max_steps=3, min_lr_ratio=1.5)


def test_scheduler_drives_every_group() -> None:
    model = tiny_model()
    cfg = OptimConfig(lr=1e-3, lr_vision=1e-4, lr_merger=5e-3, warmup_steps=2, min_lr_ratio=0.2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=6)
    for step in range(6):
        for group in opt.param_groups:
            want = cfg.part_lr(group["part"]) * reference_factor(step, 2, 6, 0.2)
            assert group["lr"] == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()


def test_param_groups_cover_trainable_once_with_part_rates() -> None:
    model = tiny_model()
    freeze(model, ["vision"])
    cfg = OptimConfig(lr=1e-3, lr_merger=2e-3, lr_llm=3e-4, weight_decay=0.1)
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in part_parameters(model, "vision")} & set(ids)
    by_part = {g["part"]: g["lr"] for g in groups}
    assert by_part == {"merger": 2e-3, "deepstack": 2e-3, "llm": 3e-4}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            exempt = p.dim() < 2 or "norm" in names[id(p)]
            assert g["weight_decay"] == (0.0 if exempt else 0.1), names[id(p)]


def test_nothing_trainable_is_an_error() -> None:
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, OptimConfig())


def test_adamw_settings() -> None:
    opt = build_optimizer(tiny_model(), OptimConfig(betas=(0.8, 0.9), eps=1e-6))
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
