"""Stage presets: the recipe's values, composition, lookup by name, distillation specs and the docs table."""

from __future__ import annotations

import pytest

from vl_train import stages
from vl_train.config import PARTS, TrainConfig
from vl_train.stages import S0, S1, S2, S3, SFT, SFT_LONG, STAGES, Distill, DistillSpec, distill_spec, stage


def test_recipe_values() -> None:
    assert S0.trainable == ("merger", "deepstack") and S0.max_length == 8192
    assert S1.trainable == PARTS and S1.max_length == 8192
    assert S2.trainable == PARTS and S2.max_length == 32768 and S2.activation_checkpointing
    assert S3.max_length == 262144 and S3.packing and S3.activation_checkpointing
    assert S3.loss_chunk_size < S2.loss_chunk_size
    assert SFT.max_length == 32768 and SFT_LONG.max_length == 262144 and SFT.thinking == "auto"
    assert Distill().trainable == ("llm",)
    for config in STAGES.values():
        assert isinstance(config, TrainConfig) and config.loss_reduction == "sqrt"
    assert S1.optim.part_lr("vision") == pytest.approx(S1.optim.lr / 10) and S1.optim.part_lr("merger") == S1.optim.lr


def test_compose_does_not_mutate() -> None:
    short = S1.replace(max_steps=5, optim={"lr": 5e-5})
    assert short.max_steps == 5 and short.optim.lr == 5e-5 and short.max_length == S1.max_length
    assert short.optim.lr_vision == S1.optim.lr_vision and short.optim.weight_decay == S1.optim.weight_decay
    assert S1.max_steps == 100_000 and S1.optim.lr == 2e-5
    with pytest.raises(ValueError, match="nope"):
        S1.replace(nope=1)


def test_stage_lookup() -> None:
    assert stage("s0") == S0 and stage("sft-long") == SFT_LONG and stage("SFT_LONG") is not SFT_LONG
    assert stage("S2", max_steps=7).max_steps == 7
    got = stage("distill_on_policy")
    assert distill_spec(got).mode == "on_policy" and distill_spec(got).loss == "reverse_kl"
    with pytest.raises(ValueError, match=r"unknown stage 'S9'.*S0"):
        stage("S9")


def test_distill_specs() -> None:
    off = Distill()
    assert distill_spec(off) == DistillSpec(mode="off_policy", loss="ce")
    on = Distill("on_policy", "jsd", beta=0.3, max_new_tokens=32, max_steps=9)
    spec = distill_spec(on)
    assert (spec.loss, spec.beta, spec.max_new_tokens, on.max_steps) == ("jsd", 0.3, 32, 9)
    assert distill_spec(TrainConfig.from_dict(on.to_dict())) == spec  # survives a round trip
    assert distill_spec(Distill("off_policy", "forward_kl")).loss == "forward_kl"
    with pytest.raises(ValueError, match="supports losses"):
        Distill("on_policy", "ce")
    with pytest.raises(ValueError, match="beta"):
        Distill("on_policy", "jsd", beta=1.5)
    with pytest.raises(ValueError, match="mode"):
        DistillSpec(mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no distillation spec"):
        distill_spec(S1)


def _table() -> dict[str, list[str]]:
    doc = stages.__doc__ or ""
    lines = [ln for ln in doc.splitlines() if ln and not ln.startswith("=") and ln.split()[0] in STAGES]
    return {ln.split()[0]: ln.split() for ln in lines}


def test_docstring_table_matches_presets() -> None:
    table = _table()
    assert set(table) == {"S0", "S1", "S2", "S3", "SFT", "SFT_LONG", "Distill"}
    for name, cols in table.items():
        config = STAGES[name]
        lr, lr_vision, max_len, pack, ckpt, chunk, warmup = cols[-7:]
        assert float(lr) == pytest.approx(config.optim.lr), name
        if "vision" in config.trainable:
            assert float(lr_vision) == pytest.approx(config.optim.part_lr("vision")), name
        else:
            assert lr_vision == "(frozen)", name
        assert int(max_len) == config.max_length and int(chunk) == config.loss_chunk_size, name
        assert int(warmup) == config.optim.warmup_steps, name
        assert (pack, ckpt) == ("yes" if config.packing else "no", "yes" if config.activation_checkpointing else "no")
        trainable = "all" if config.trainable == PARTS else ", ".join(config.trainable)
        assert " ".join(cols[1:-7]) == trainable, name
