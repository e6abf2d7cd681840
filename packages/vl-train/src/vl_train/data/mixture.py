"""Mixture sampling over data sources by ratio, with deterministic shuffling whose state is checkpointed.

Implements the data mixing of Qwen3-VL's training stages (Qwen3-VL technical report, arXiv
2511.21631, section 3; REFERENCE.md section 4: e.g. text-only vs multimodal data per stage):

- draw ``k`` of the mixture picks a source at random with probability ``ratio / sum(ratios)``, from a
  generator seeded by ``(seed, k)`` alone, so the choice sequence needs no state beyond ``k``;
- a map-style source (``len`` + indexing) is read through a fresh permutation per epoch, seeded by
  ``(seed, source, epoch)``;
- a streaming source (only iterable: a lazily read JSONL file, a ``datasets.IterableDataset``) is read
  through a shuffle buffer whose generator is seeded the same way; it is iterated again for each epoch;
- the whole state is ``(step, per source: epoch, position)`` (:class:`ShuffleState`): resuming from it
  yields exactly the samples an uninterrupted run would (a stream is replayed up to its position).

Notation: ``k`` draw index; ``e`` epoch of one source; ``position`` draws from that source in epoch ``e``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["MixtureSampler", "ShuffleState", "SourceState"]


@dataclass
class SourceState:
    """Where one source stands: its epoch, draws made in that epoch, and draws made in all."""

    epoch: int = 0
    position: int = 0
    total: int = 0


@dataclass
class ShuffleState:
    """Checkpointable state of a :class:`MixtureSampler` (plain data, JSON-serialisable via ``asdict``)."""

    seed: int
    step: int = 0
    sources: dict[str, SourceState] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what :meth:`MixtureSampler.state_dict` returns)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShuffleState:
        """Inverse of :meth:`to_dict`."""
        sources = {k: SourceState(**dict(v)) for k, v in dict(data["sources"]).items()}
        return cls(seed=int(data["seed"]), step=int(data["step"]), sources=sources)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class _Source:
    """One source read in epochs: shuffled permutation (map-style) or shuffle buffer (streaming)."""

    def __init__(self, name: str, data: Any, seed: int, shuffle: bool, buffer_size: int) -> None:
        self.name, self.data, self.seed, self.shuffle = name, data, seed, shuffle
        self.key = zlib.crc32(name.encode("utf-8"))
        self.mapped = hasattr(data, "__len__") and hasattr(data, "__getitem__")
        if self.mapped and len(data) == 0:
            raise ValueError(f"source {name!r} is empty")
        if not self.mapped and iter(data) is data:
            raise ValueError(
                f"source {name!r} is a one-shot iterator: pass a re-iterable object (a list, a dataset, a "
                "JsonlDataset) so that epochs and resuming can iterate it again"
            )
        self.buffer_size = max(1, buffer_size) if shuffle else 1
        self.state = SourceState()
        self._order: np.ndarray | None = None
        self._stream: Iterator[Any] | None = None
        self._buffer: list[Any] = []
        self._gen: np.random.Generator | None = None

    def restore(self, state: SourceState) -> None:
        self.state = SourceState(state.epoch, state.position, state.total)
        self._order = None
        self._stream = None
        if not self.mapped:
            position = self.state.position
            self._start_epoch()
            for _ in range(position):  # replay: a stream has no random access
                self._draw_stream()

    def next(self) -> Any:
        if self.mapped:
            n = len(self.data)
            if self.state.position >= n:
                self.state.epoch += 1
                self.state.position = 0
                self._order = None
            if self._order is None:
                self._order = (
                    _rng(self.seed, self.key, self.state.epoch).permutation(n) if self.shuffle else np.arange(n)
                )
            item = self.data[int(self._order[self.state.position])]
        else:
            if self._stream is None:
                self._start_epoch()
            item = self._draw_stream()
            if item is _END:
                if self.state.position == 0:
                    raise ValueError(f"source {self.name!r} is empty")
                self.state.epoch += 1
                self.state.position = 0
                self._start_epoch()
                item = self._draw_stream()
        self.state.position += 1
        self.state.total += 1
        return item

    def _start_epoch(self) -> None:
        self._stream = iter(self.data)
        self._buffer = []
        self._gen = _rng(self.seed, self.key, self.state.epoch)

    def _draw_stream(self) -> Any:
        assert self._stream is not None and self._gen is not None
        while len(self._buffer) < self.buffer_size:
            item = next(self._stream, _END)
            if item is _END:
                break
            self._buffer.append(item)
        if not self._buffer:
            return _END
        at = int(self._gen.integers(len(self._buffer))) if self.shuffle else 0
        # swap-remove keeps the draw O(1); the order stays a pure function of the seed
        self._buffer[at], self._buffer[-1] = self._buffer[-1], self._buffer[at]
        return self._buffer.pop()


_END = object()


class MixtureSampler(Iterator[Any]):
    """An endless, deterministic interleaving of several sources by ratio.

    Args:
        sources: Name -> data. Map-style data (``len`` + ``[i]``) is shuffled per epoch; anything
            only iterable is streamed through a shuffle buffer and must be re-iterable.
        ratios: Name -> non-negative weight (normalised); None gives equal weights.
        seed: Seed of every random choice.
        shuffle: Shuffle within sources (False reads them in order).
        shuffle_buffer: Buffer size for streaming sources.

    Raises:
        ValueError: No sources, ratio names that differ from the source names, negative or
            non-finite ratios, all-zero ratios, an empty map-style source or a one-shot iterator.

    Example:
        >>> mix = MixtureSampler({"text": texts, "vl": JsonlDataset("vl.jsonl")}, {"text": 1, "vl": 3}, seed=0)
        >>> batch = [next(mix) for _ in range(8)]
        >>> state = mix.state_dict()  # store with the checkpoint; load_state_dict(state) resumes exactly
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        ratios: Mapping[str, float] | None = None,
        seed: int = 0,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
    ) -> None:
        if not sources:
            raise ValueError("MixtureSampler needs at least one source")
        names = list(sources)
        ratios = dict(ratios) if ratios is not None else {n: 1.0 for n in names}
        if set(ratios) != set(names):
            raise ValueError(
                f"ratios name {sorted(ratios)} but sources are {sorted(names)}: "
                f"missing {sorted(set(names) - set(ratios))}, unknown {sorted(set(ratios) - set(names))}"
            )
        weights = np.array([float(ratios[n]) for n in names])
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"ratios must be finite, >= 0 and not all 0, got {dict(zip(names, weights.tolist()))}")
        self.names = names
        self.probabilities = weights / weights.sum()
        self._cumulative = np.cumsum(self.probabilities)
        self.seed = int(seed)
        self._sources = {n: _Source(n, sources[n], self.seed, shuffle, shuffle_buffer) for n in names}
        self.step = 0

    def __next__(self) -> Any:
        return self.next_with_source()[1]

    def next_with_source(self) -> tuple[str, Any]:
        """The next sample and the name of the source it came from."""
        # the choice depends on (seed, step) alone, so resuming needs no generator state
        u = float(_rng(self.seed, 0x5EED, self.step).random())
        index = min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.names) - 1)
        while self.probabilities[index] == 0:  # guard against float round-off at the top
            index -= 1
        name = self.names[index]
        item = self._sources[name].next()
        self.step += 1
        return name, item

    @property
    def state(self) -> ShuffleState:
        """The current :class:`ShuffleState` (a copy)."""
        sources = {n: SourceState(s.state.epoch, s.state.position, s.state.total) for n, s in self._sources.items()}
        return ShuffleState(seed=self.seed, step=self.step, sources=sources)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for checkpoints."""
        return self.state.to_dict()

    def load_state_dict(self, state: Mapping[str, Any] | ShuffleState) -> None:
        """Continue exactly where the sampler that wrote ``state`` stood.

        Raises:
            ValueError: A different seed or different source names than this sampler's.
        """
        restored = state if isinstance(state, ShuffleState) else ShuffleState.from_dict(state)
        if restored.seed != self.seed:
            raise ValueError(f"state was written with seed {restored.seed}, this sampler has seed {self.seed}")
        if set(restored.sources) != set(self.names):
            raise ValueError(f"state names sources {sorted(restored.sources)}, this sampler has {sorted(self.names)}")
        self.step = restored.step
        for name, source_state in restored.sources.items():
            self._sources[name].restore(source_state)

    def counts(self) -> dict[str, int]:
        """Samples drawn so far from each source."""
        return {n: s.state.total for n, s in self._sources.items()}

    def expected_fraction(self) -> dict[str, float]:
        """Each source's share of the draws (the normalised ratios)."""
        return {n: float(p) for n, p in zip(self.names, self.probabilities)}
