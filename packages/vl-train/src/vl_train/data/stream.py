"""A resumable stream of training batches: mixture sampling -> chat rendering -> packing (or padding).

The pipeline of REFERENCE.md section 4 (Qwen3-VL technical report, arXiv 2511.21631, section 3: data
mixtures per stage, packed long rows) as one iterator whose position is checkpointable, so that a
resumed run sees exactly the batches an uninterrupted one would.

Saved state (the choice): the :class:`~vl_train.data.mixture.MixtureSampler` state *at the oldest draw
still pending in the packer* plus the draw indices of the pending samples (those in batches already
packed but not yet yielded, and those in the packing buffer). Restoring loads that mixture state and
re-draws and re-renders only the draws from there on (at most about one packing buffer), instead of
replaying every batch since the start; the state is plain ints and dicts (no tensors, no samples).

Packing mirrors :func:`~vl_train.data.packing.iter_packed`: ``buffer_size`` rendered samples are
first-fit packed, whole batches of ``rows_per_batch`` rows are emitted, and leftover rows go back to
the buffer. Without packing each row is one sample, right-padded by
:func:`~vl_train.data.collate.collate`.

Notation: draw ``k`` is the ``k``-th sample taken from the mixture (counted from 0, dropped ones too).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .collate import collate
from .packing import first_fit, pack_rows
from .render import RenderedSample

__all__ = ["PackedStream"]

Row = list[tuple[int, RenderedSample]]


class PackedStream(Iterator[dict[str, torch.Tensor]]):
    """Endless batches from ``mixture`` rendered by ``renderer``, with ``state_dict`` / ``load_state_dict``.

    Args:
        mixture: A :class:`~vl_train.data.mixture.MixtureSampler` (any iterator with plain-data
            ``state_dict`` / ``load_state_dict`` that replays deterministically works).
        renderer: A :class:`~vl_train.data.render.SampleRenderer` (a callable sample ->
            ``RenderedSample | None``; None drops the sample).
        max_length: Row length ``L`` when packing.
        pad_token_id: Token id of padding.
        rows_per_batch: Rows per batch.
        packing: Pack samples into rows (else one padded sample per row).
        buffer_size: Samples gathered before each first-fit packing.

    Raises:
        ValueError: ``rows_per_batch``, ``buffer_size`` or ``max_length`` < 1.
    """

    def __init__(
        self,
        mixture: Any,
        renderer: Any,
        *,
        max_length: int,
        pad_token_id: int,
        rows_per_batch: int,
        packing: bool = True,
        buffer_size: int = 64,
    ) -> None:
        if rows_per_batch < 1 or buffer_size < 1 or max_length < 1:
            raise ValueError(
                f"rows_per_batch, buffer_size and max_length must be >= 1, "
                f"got {rows_per_batch}, {buffer_size} and {max_length}"
            )
        self.mixture, self.renderer = mixture, renderer
        self.max_length, self.pad_token_id = max_length, pad_token_id
        self.rows_per_batch, self.packing, self.buffer_size = rows_per_batch, packing, buffer_size
        self.batches = 0  # batches yielded
        self._draws = 0
        self._snapshots: dict[int, Any] = {}  # mixture state before each pending draw
        self._buffer: Row = []
        self._ready: deque[list[Row]] = deque()

    def _draw(self) -> tuple[int, RenderedSample | None, Any]:
        snapshot = self.mixture.state_dict()
        out = self.renderer(next(self.mixture))
        self._draws += 1
        return self._draws - 1, out, snapshot

    def _pack(self, final: bool) -> None:
        if self.packing:
            rows = first_fit([len(s) for _, s in self._buffer], self.max_length)
        else:
            rows = [[i] for i in range(len(self._buffer))]
        full = len(rows) if final else len(rows) // self.rows_per_batch * self.rows_per_batch
        laid = [[self._buffer[i] for i in row] for row in rows]
        for at in range(0, full, self.rows_per_batch):
            self._ready.append(laid[at : at + self.rows_per_batch])
        self._buffer = [item for row in laid[full:] for item in row]

    def __next__(self) -> dict[str, Any]:
        while not self._ready:
            try:
                while len(self._buffer) < self.buffer_size:
                    k, out, snapshot = self._draw()
                    if out is not None:
                        self._buffer.append((k, out))
                        self._snapshots[k] = snapshot
            except StopIteration:  # a finite source: flush what is left, then stop
                if not self._buffer:
                    raise
                self._pack(final=True)
                break
            self._pack(final=False)
        rows = self._ready.popleft()
        for row in rows:
            for k, _ in row:
                self._snapshots.pop(k, None)
        self.batches += 1
        if self.packing:
            samples = [s for row in rows for _, s in row]
            layout, at = [], 0
            for row in rows:
                layout.append(list(range(at, at + len(row))))
                at += len(row)
            batch: dict[str, Any] = pack_rows(samples, layout, self.max_length, pad_token_id=self.pad_token_id)
        else:
            batch = collate([s for row in rows for _, s in row], pad_token_id=self.pad_token_id)
        batch["sample_ids"] = [[s.sample_id for _, s in row] for row in rows]  # for error messages, not the model
        return batch

    @property
    def stats(self) -> Any:
        """The renderer's :class:`~vl_train.data.format.DataStats` (what was skipped, dropped, truncated)."""
        return getattr(self.renderer, "stats", None)

    def _pending(self) -> list[int]:
        return [k for batch in self._ready for row in batch for k, _ in row] + [k for k, _ in self._buffer]

    def state_dict(self) -> dict[str, Any]:
        """The position as plain data: see the module docstring."""
        pending = self._pending()
        start = min(pending) if pending else self._draws
        return {
            "batches": self.batches,
            "draws": self._draws,
            "start": start,
            "mixture": self._snapshots[start] if pending else self.mixture.state_dict(),
            "ready": [[[k for k, _ in row] for row in batch] for batch in self._ready],
            "buffer": [k for k, _ in self._buffer],
            "stats": self.stats.state_dict() if self.stats is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where the stream that wrote ``state`` stood (same sources, seed and settings).

        Raises:
            ValueError: A pending draw rendered to nothing on replay (the data or settings changed).
        """
        start, draws = int(state["start"]), int(state["draws"])
        self.mixture.load_state_dict(state["mixture"])
        self._draws = start
        rendered: dict[int, tuple[RenderedSample, Any]] = {}
        while self._draws < draws:
            k, out, snapshot = self._draw()
            if out is not None:
                rendered[k] = (out, snapshot)

        def take(k: int) -> tuple[int, RenderedSample]:
            if k not in rendered:
                raise ValueError(
                    f"draw {k} was pending in the saved stream but renders to nothing now: "
                    "the data sources or the rendering settings differ from the saved run's"
                )
            self._snapshots[k] = rendered[k][1]
            return k, rendered[k][0]

        self._snapshots = {}
        self._ready = deque([[[take(int(k)) for k in row] for row in batch] for batch in state["ready"]])
        self._buffer = [take(int(k)) for k in state["buffer"]]
        self.batches = int(state["batches"])
        if state.get("stats") is not None and self.stats is not None:  # the replay above counted its draws again
            self.stats.load_state_dict(state["stats"])
