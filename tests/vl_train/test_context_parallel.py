"""Context parallelism (Ulysses over a CP group, the tower data-parallel across it, FSDP2 on a dp x cp mesh).

Packed multimodal rows (images, a video, text; samples cut by the CP part boundaries; a row length that
4 does not divide) must train on ``C`` = 2 and 4 ranks per row, and on a 2 x 2 (dp x cp) mesh, exactly as
one process trains on the whole rows: the same losses, gradient norms and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _cp import LENGTH, cp_run
from _launch import GLOO, launch
from _threads import one_thread

WORKER = Path(__file__).with_name("_cp_worker.py")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Any]:
    with one_thread():  # as the ranks run
        model, result = cp_run(tmp_path_factory.mktemp("one"))
    assert result.losses[0] != result.losses[-1]
    return model.state_dict(), result


def _check(got: dict[str, Any], want: tuple[dict[str, torch.Tensor], Any]) -> None:
    state, result = want
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(result.losses), rtol=1e-5, atol=0)
    norms = [r["grad_norm"] for r in result.records]
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(norms), rtol=1e-5, atol=0)
    assert set(got["state"]) == set(state)
    for key, value in state.items():
        # atol 1e-5: the most sensitive weight is the embedding row of a token seen once (its first AdamW step
        # normalises a gradient whose float reduction order differs): 1.6e-6 off with the dense packed mask,
        # 3.2e-6 with per-sample SDPA spans, while losses and gradient norms agree to 1e-5
        torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_two_cp_ranks_train_a_packed_multimodal_row_like_one_process(tmp_path: Path, one_process: Any) -> None:
    launch(WORKER, str(tmp_path), "2", "2+ckpt", world=2)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["2"]["part_length"] == LENGTH // 2  # each rank decodes half of the row
    _check(got["2"], one_process)
    _check(got["2+ckpt"], one_process)  # recomputed blocks redo their all-to-alls in backward


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_four_ranks_cp4_and_dp2_x_cp2_train_like_one_process(tmp_path: Path, one_process: Any) -> None:
    launch(WORKER, str(tmp_path), "4", "2", world=4)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["4"]["part_length"] == 8  # 30 positions padded to 32, a quarter each
    assert got["2"]["part_length"] == LENGTH // 2
    _check(got["4"], one_process)
    _check(got["2"], one_process)


def _context(size: int, rank: int) -> Any:
    """A ``ContextParallel`` for rank ``rank`` of ``size`` without a process group (its pure parts only)."""
    from vl_train.context_parallel import ContextParallel, UlyssesAttention

    sequence = UlyssesAttention.__new__(UlyssesAttention)
    sequence.group, sequence.size, sequence.rank = None, size, rank
    context = ContextParallel.__new__(ContextParallel)
    context.group, context.size, context.rank, context.sequence = None, size, rank, sequence
    return context


@pytest.mark.parametrize("reduction", ["sqrt", "sample", "token"])
def test_the_parts_losses_add_up_to_the_whole_rows_loss(reduction: str) -> None:
    from vl_train.losses import loss_normalizer, reduce_token_losses, sample_layout

    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 50, (2, 12), generator=gen)
    targets[torch.rand(2, 12, generator=gen) < 0.4] = -100
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])  # samples cut by the part boundaries
    per_position = torch.rand(2, 12, generator=gen)
    z = loss_normalizer(targets, segments, reduction)
    whole = sample_layout(targets, segments)
    want = reduce_token_losses(per_position.reshape(-1)[whole.rows], whole, reduction, z).loss
    got = torch.zeros(())
    for rank in range(3):
        context = _context(3, rank)
        layout = context.layout(targets, segments)
        part = context.local(per_position).reshape(-1)[layout.rows]
        got = got + reduce_token_losses(part, layout, reduction, z).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_padding_makes_rows_a_multiple_of_the_cp_size() -> None:
    batch = {"input_ids": torch.ones(2, 10, dtype=torch.long), "segment_ids": torch.zeros(2, 10, dtype=torch.long)}
    padded, targets = _context(4, 0).pad(batch, torch.zeros(2, 10, dtype=torch.long))
    assert padded["input_ids"].shape == (2, 12) and targets.shape == (2, 12)
    assert padded["attention_mask"][:, 10:].eq(0).all() and padded["segment_ids"][:, 10:].eq(-1).all()
    assert targets[:, 10:].eq(-100).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        _context(4, 0).bounds(10)


def test_bad_settings_are_named(tmp_path: Path) -> None:
    from _trainer_helpers import tiny_model

    from vl_train import TrainConfig, Trainer
    from vl_train.context_parallel import _divisible_heads, apply_context_parallel

    with pytest.raises(ValueError, match="context_parallel must be a positive int"):
        TrainConfig(context_parallel=0)
    with pytest.raises(ValueError, match="context_parallel = 2 needs that many ranks"):
        Trainer(tiny_model(), TrainConfig(context_parallel=2, output_dir=str(tmp_path)), iter([]))
    kv = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="6 query and 2 key/value heads"):
        _divisible_heads(kv, kv, 6, 4)
    repeated, _ = _divisible_heads(kv, kv, 4, 4)
    assert repeated.shape[1] == 4

    class NoSequenceSplit(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="cannot run its decoder on a part of the sequence"):
        apply_context_parallel(NoSequenceSplit(), None)


def test_data_parallel_batches_pass_the_stream_state_through() -> None:
    from _trainer_helpers import SyntheticBatches

    from vl_train.context_parallel import DataParallelBatches

    source = SyntheticBatches(seed=1)
    shard = DataParallelBatches(source)  # one process: one group, every batch
    first = next(shard)
    assert torch.equal(first["input_ids"], source.batch(0)["input_ids"]) and shard.state_dict() == {"index": 1}
    shard.load_state_dict({"index": 0})
    assert torch.equal(next(shard)["input_ids"], first["input_ids"])
