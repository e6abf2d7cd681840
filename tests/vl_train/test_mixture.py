"""Mixture sampler: ratios, per-epoch shuffling, streaming sources and exact resumption from checkpointed state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _data_helpers import text_sample

from vl_train.data.format import JsonlDataset, write_jsonl
from vl_train.data.mixture import MixtureSampler, ShuffleState


def _jsonl(tmp_path: Path, n: int) -> JsonlDataset:
    return JsonlDataset(write_jsonl([text_sample(f"s{i}") for i in range(n)], tmp_path / "stream.jsonl"))


def _key(item: Any) -> Any:
    return item["id"] if isinstance(item, dict) else item


def _sampler(tmp_path: Path, seed: int = 3) -> MixtureSampler:
    sources = {"text": list(range(11)), "vl": [f"v{i}" for i in range(5)], "stream": _jsonl(tmp_path, 7)}
    return MixtureSampler(sources, {"text": 1.0, "vl": 2.0, "stream": 1.5}, seed=seed, shuffle_buffer=3)


def test_resume_yields_the_same_following_samples(tmp_path: Path) -> None:
    first = _sampler(tmp_path)
    _ = [next(first) for _ in range(37)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    expected = [_key(next(first)) for _ in range(20)]
    resumed = _sampler(tmp_path)
    resumed.load_state_dict(state)
    assert [_key(next(resumed)) for _ in range(20)] == expected
    # the same from the dataclass form, and a fresh sampler replays the whole sequence
    again = _sampler(tmp_path)
    again.load_state_dict(ShuffleState.from_dict(state))
    assert [_key(next(again)) for _ in range(20)] == expected
    fresh = _sampler(tmp_path)
    assert [_key(next(fresh)) for _ in range(57)][37:] == expected


def test_seed_changes_the_order(tmp_path: Path) -> None:
    def seq(seed: int) -> list[Any]:
        return [_key(x) for x, _ in zip(_sampler(tmp_path, seed=seed), range(40))]

    assert seq(1) == seq(1) and seq(1) != seq(2)


def test_ratios_are_respected() -> None:
    mix = MixtureSampler({"a": [0], "b": [1], "c": [2]}, {"a": 1.0, "b": 3.0, "c": 0.0}, seed=0)
    n = 4000
    draws = [next(mix) for _ in range(n)]
    share = draws.count(1) / n
    sigma = (0.75 * 0.25 / n) ** 0.5
    assert abs(share - 0.75) < 4 * sigma and 2 not in draws
    assert mix.counts() == {"a": draws.count(0), "b": draws.count(1), "c": 0}
    assert mix.expected_fraction() == {"a": 0.25, "b": 0.75, "c": 0.0}


def test_each_epoch_is_a_fresh_permutation(tmp_path: Path) -> None:
    mix = MixtureSampler({"x": list(range(9))}, seed=5)
    epochs = [[next(mix) for _ in range(9)] for _ in range(3)]
    assert all(sorted(e) == list(range(9)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(9))
    assert mix.state.sources["x"].epoch == 2 and mix.state.sources["x"].total == 27
    ordered = MixtureSampler({"x": list(range(4))}, seed=5, shuffle=False)
    assert [next(ordered) for _ in range(6)] == [0, 1, 2, 3, 0, 1]


def test_streaming_source_is_shuffled_per_epoch_and_read_lazily(tmp_path: Path) -> None:
    mix = MixtureSampler({"s": _jsonl(tmp_path, 10)}, seed=0, shuffle_buffer=4)
    epochs = [[_key(next(mix)) for _ in range(10)] for _ in range(2)]
    assert all(sorted(e) == sorted(f"s{i}" for i in range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != [f"s{i}" for i in range(10)]
    name, item = mix.next_with_source()
    assert name == "s" and item["_source"].endswith(".jsonl:" + str(int(item["id"][1:]) + 1))


def test_datasets_iterable_source() -> None:
    datasets = pytest.importorskip("datasets")
    stream = datasets.Dataset.from_list([{"id": str(i)} for i in range(6)]).to_iterable_dataset()
    mix = MixtureSampler({"hf": stream}, seed=1, shuffle_buffer=2)
    _ = [next(mix) for _ in range(4)]
    state = mix.state_dict()
    expected = [next(mix)["id"] for _ in range(5)]
    other = MixtureSampler({"hf": stream}, seed=1, shuffle_buffer=2)
    other.load_state_dict(state)
    assert [next(other)["id"] for _ in range(5)] == expected


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        MixtureSampler({"a": [1], "b": [2]}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="ratios must be finite"):
        MixtureSampler({"a": [1]}, {"a": -1.0})
    with pytest.raises(ValueError, match="one-shot iterator"):
        MixtureSampler({"a": iter([1, 2])})
    with pytest.raises(ValueError, match="'a' is empty"):
        MixtureSampler({"a": []})
    with pytest.raises(ValueError, match="'e' is empty"):
        next(MixtureSampler({"e": _Empty()}))
    mix = MixtureSampler({"a": [1]}, seed=1)
    with pytest.raises(ValueError, match="seed 2"):
        mix.load_state_dict(MixtureSampler({"a": [1]}, seed=2).state_dict())
    with pytest.raises(ValueError, match=r"\['b'\]"):
        mix.load_state_dict(MixtureSampler({"b": [1]}, seed=1).state_dict())


class _Empty:
    def __iter__(self) -> Any:
        return iter(())
