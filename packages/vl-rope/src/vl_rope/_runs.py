"""Runs of equal modality and their expansion to (T, H, W) positions, behind ``get_rope_index``.

A run is a maximal span of one modality within a row (or packed sample); padding is a run of
its own. Runs are matched to vision grids, given start positions by a cumulative sum of their
advances, cut into lines (``w/m`` vision tokens sharing T and H, or one text run) and expanded
to tokens with one gather and a multiply-add per axis.

Notation: ``m`` spatial merge size; ``(t, h, w)`` a grid in patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._grids import check_grid_thw

VisionAdvance = Literal["extent", "max_position"]

MODALITY_NAMES = {1: "image", 2: "video"}
PAD = 3  # modality code of padding tokens (attention_mask 0 or negative segment id)


@dataclass
class Grids:
    """Vision grids of one modality, one entry per run of tokens expected in input_ids."""

    thw: torch.Tensor  # [G, 3]
    interval: torch.Tensor  # [G] float32, temporal position step
    source: torch.Tensor  # [G] index into the caller's grid tensor (videos split per temporal patch)

    def tokens(self, m: int) -> torch.Tensor:
        return self.thw.prod(-1) // (m * m)


def vision_grids(
    grid_thw: torch.Tensor | None,
    name: str,
    m: int,
    split_temporal: bool,
    interval: torch.Tensor | None,
    device: torch.device,
) -> Grids | None:
    if grid_thw is None:
        return None
    thw = check_grid_thw(grid_thw, name, m).to(device)
    source = torch.arange(len(thw), device=device)
    step = torch.ones(len(thw), dtype=torch.float32, device=device) if interval is None else interval
    if split_temporal:  # each temporal patch becomes its own t = 1 grid, as its tokens form their own run
        source = torch.repeat_interleave(source, thw[:, 0])
        thw = thw[source].clone()
        thw[:, 0] = 1
        step = step[source]
    return Grids(thw, step, source)


class Runs:
    """Per-run bookkeeping; positions are expanded to tokens only once, at the end.

    A run is a maximal span of one modality within a row (or packed sample). Each run
    is cut into *lines*: a vision run with grid (t, h, w) into ``t * h/m`` lines of
    ``w/m`` tokens (constant T and H, W counting up), a text or padding run into one
    line. Expanding lines to tokens then needs no per-token division.
    """

    def __init__(
        self, starts: torch.Tensor, lengths: torch.Tensor, mod: torch.Tensor, new_segment: torch.Tensor, width: int
    ) -> None:
        self.starts, self.lengths, self.mod, self.new_segment, self.width = starts, lengths, mod, new_segment, width
        n = len(starts)
        is_text = mod == 0
        self.advance = torch.where(is_text, lengths, torch.zeros_like(lengths))
        self.max_offset = torch.where(is_text, lengths - 1, torch.full_like(lengths, -1))
        self.lines = torch.ones(n, dtype=torch.long, device=starts.device)
        self.line_length = lengths.clone()
        self.lines_per_frame = torch.ones_like(lengths)  # h/m for vision runs
        self.interval = torch.ones(n, dtype=torch.float32, device=starts.device)
        self.scaled_time = False

    @classmethod
    def find(cls, run_start: torch.Tensor, mod: torch.Tensor, boundary: torch.Tensor, width: int) -> Runs:
        starts = run_start.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=starts.new_tensor([run_start.numel()]))
        return cls(starts, lengths, mod[starts], boundary[starts], width)

    def place_vision(
        self, modality: int, grids: Grids | None, name: str, m: int, vision_advance: VisionAdvance
    ) -> None:
        """Match this modality's runs to its grids (checking count and lengths) and set their geometry."""
        label = MODALITY_NAMES[modality]
        sel = (self.mod == modality).nonzero().squeeze(1)
        n_runs = sel.numel()
        if grids is None:
            if n_runs:
                raise ValueError(f"input_ids hold {n_runs} runs of {label} tokens but {name} is None")
            return
        n_grids = len(grids.thw)
        n_source = int(grids.source.max()) + 1 if n_grids else 0
        if n_runs != n_grids:
            described = f"{n_grids} {label}s"
            if n_grids != n_source:
                described = f"{n_source} {label}s with {n_grids} temporal patches in all (one run of tokens each)"
            raise ValueError(f"input_ids hold {n_runs} runs of {label} tokens but {name} describes {described}")
        if n_runs == 0:
            return
        expected = grids.tokens(m)
        wrong = self.lengths[sel] != expected
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            t, h, w = grids.thw[i].tolist()
            src = int(grids.source[i])
            where = f"{name}[{src}]"
            if n_grids != n_source:  # videos split per temporal patch
                where += f" (temporal patch {i - int((grids.source < src).sum())})"
            start = int(self.starts[sel[i]])
            raise ValueError(
                f"{label} run {i} (row {start // self.width}, position {start % self.width}) has "
                f"{int(self.lengths[sel[i]])} tokens but {where} with (t, h, w) = ({t}, {h}, {w}) needs "
                f"t*h*w/merge^2 = {int(expected[i])}"
            )
        t, h, w = grids.thw.unbind(-1)
        hm, wm = h // m, w // m
        last_t = ((t - 1).float() * grids.interval).long()
        run_max = torch.maximum(torch.maximum(last_t, hm - 1), wm - 1)
        self.max_offset[sel] = run_max
        self.advance[sel] = torch.maximum(h, w) // m if vision_advance == "extent" else run_max + 1
        self.lines[sel] = t * hm
        self.line_length[sel] = wm
        self.lines_per_frame[sel] = hm
        self.interval[sel] = grids.interval
        self.scaled_time = self.scaled_time or bool((grids.interval != 1).any())

    def base(self) -> torch.Tensor:
        """Position where each run starts: the exclusive cumsum of advances within its segment."""
        exclusive = torch.cumsum(self.advance, 0) - self.advance
        segment = torch.cumsum(self.new_segment.long(), 0) - 1
        return exclusive - exclusive[self.new_segment][segment]

    def positions(self) -> torch.Tensor:
        """(T, H, W) of every token, ``[3, tokens]``; padding tokens get 0."""
        device = self.starts.device
        is_text, is_pad = self.mod == 0, self.mod == PAD
        base = self.base().masked_fill(is_pad, 0)
        # lines: T and H fixed per line (vision) or counting up with W (text); padding stays 0
        line_run = torch.repeat_interleave(torch.arange(len(self.starts), device=device), self.lines)
        first_line = torch.cumsum(self.lines, 0) - self.lines
        line_index = torch.arange(len(line_run), device=device) - first_line.index_select(0, line_run)
        per_frame = self.lines_per_frame.index_select(0, line_run)
        frame, row = line_index // per_frame, line_index % per_frame
        if self.scaled_time:
            frame = (frame.float() * self.interval.index_select(0, line_run)).long()
        line_base = base.index_select(0, line_run)
        line_length = self.line_length.index_select(0, line_run)
        first_token = torch.cumsum(line_length, 0) - line_length
        # token k of a line at first_token f: T = line_t + (k - f) * text, H likewise, W = base + (k - f) * not_pad;
        # folding the -f * slope into per-line constants leaves one gather and two multiply-adds per token
        text = is_text.long().index_select(0, line_run)
        not_pad = (~is_pad).long().index_select(0, line_run)
        constants = (line_base + frame - first_token * text, line_base + row - first_token * text)
        w_constant = line_base - first_token * not_pad
        token_line = torch.repeat_interleave(torch.arange(len(line_run), device=device), line_length)
        k = torch.arange(len(token_line), device=device)
        out = torch.empty(3, len(token_line), dtype=torch.long, device=device)
        text_step = text.index_select(0, token_line).mul_(k)
        for axis, constant in enumerate(constants):  # 1-D gathers: several times faster than one along dim 1
            torch.index_select(constant, 0, token_line, out=out[axis]).add_(text_step)
        torch.index_select(w_constant, 0, token_line, out=out[2]).add_(not_pad.index_select(0, token_line).mul_(k))
        return out

    def row_max(self, batch: int) -> torch.Tensor:
        """Largest position of each row (-1 for an all-padding row)."""
        run_max = torch.where(self.mod == PAD, torch.full_like(self.advance, -1), self.base() + self.max_offset)
        out = torch.full((batch,), -1, dtype=torch.long, device=self.starts.device)
        return out.scatter_reduce(0, self.starts // self.width, run_max, reduce="amax")
