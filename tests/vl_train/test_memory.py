"""``vl_train.memory.estimate_memory`` against numbers worked out by hand."""

from __future__ import annotations

import pytest

from vl_train.memory import QWEN3_VL_SIZES, ModelSize, estimate_memory, memory_table

TINY = ModelSize(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, vision_params=100)


def test_parameter_count_by_hand() -> None:
    # per layer: q,k,v 4*(2+2)*2=32, o 2*2*4=16, MLP 3*4*8=96, norms 2*4=8, q/k norms 2*2=4 -> 156
    assert TINY.text_params() == 10 * 4 * 2 + 2 * 156 + 4 == 396
    assert TINY.params() == 496
    tied = ModelSize(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, tied=True)
    assert tied.text_params() == 396 - 40


def test_estimate_by_hand() -> None:
    est = estimate_memory(TINY, tokens=8, labelled=6, world_size=2, chunk_size=4)
    assert est.states == 16 * 496 // 2 == 3968
    assert est.checkpoints == 2 * 8 * 4 * 2  # layers x L x d x 2 bytes
    assert est.working == 2 * 8 * (8 + 8 + 4 + 24) * 2 == 1408  # one layer's recompute, x2 for gradients
    assert est.loss_chunked == 4 * 2 * 10 * 4 and est.loss_full == 6 * 2 * 10 * 4
    assert est.total == 3968 + 128 + 1408 + 320
    assert est.total_unchunked == 3968 + 128 + 1408 + 480
    plain = estimate_memory(TINY, tokens=8, labelled=6, world_size=2, chunk_size=4, activation_checkpointing=False)
    assert plain.checkpoints == 0 and plain.working == 2 * 1408
    # a chunk larger than the labelled tokens is just all of them
    assert estimate_memory(TINY, tokens=8, labelled=3, chunk_size=4).loss_chunked == 3 * 80


def test_real_sizes_are_plausible() -> None:
    # the public model names give the parameter counts to within a few percent
    for name, billions in (("Qwen3-VL-2B", 2.1), ("Qwen3-VL-8B", 8.8), ("Qwen3-VL-32B", 33.4)):
        assert QWEN3_VL_SIZES[name].params() / 1e9 == pytest.approx(billions, rel=0.05), name
    est = estimate_memory(QWEN3_VL_SIZES["Qwen3-VL-8B"])  # 256K tokens, all labelled, 8 ranks
    assert est.loss_full == 262_144 * 151_936 * 8  # ~297 GiB of logits + gradient without chunking
    assert est.loss_full / est.loss_chunked == 64


def test_table_has_a_row_per_model() -> None:
    table = memory_table()
    assert table.count("\n") == 1 + len(QWEN3_VL_SIZES)
    assert "| Qwen3-VL-8B | 8.77B |" in table


@pytest.mark.parametrize(
    "kwargs", [{"tokens": 0}, {"world_size": 0}, {"chunk_size": -1}, {"labelled": 9, "tokens": 8}, {"state_bytes": 0}]
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="estimate_memory needs"):
        estimate_memory(TINY, **kwargs)


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="zero \\['layers'\\]"):
        ModelSize(hidden=4, layers=0, heads=2, kv_heads=1, head_dim=2, intermediate=8)
