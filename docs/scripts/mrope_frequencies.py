"""Figure: which position axis (T/H/W) drives each MRoPE frequency, chunked vs interleaved.

Writes ``docs/assets/mrope_frequencies.png`` (run by ``nox -s docs``). Top: the 64 rotary
frequencies of a 128-dim head coloured by axis, for Qwen2-VL's chunked sections ``[16, 24, 24]``
and Qwen3-VL's interleaved ``[24, 20, 20]``. Bottom: the wavelength ``2*pi / inv_freq_i`` of
each frequency (``inv_freq_i = theta ** (-2i / 128)``) on a log scale, one curve per layout's
theta. Chunking gives T only the fast (short-wavelength) frequencies and W only the slow ones;
interleaving spreads every axis over the whole spectrum.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from vl_rope import mrope_axis_of_frequency

OUT = Path(__file__).resolve().parents[1] / "assets" / "mrope_frequencies.png"
HEAD_DIM = 128
AXES = ("T", "H", "W")
COLORS = ("#4C72B0", "#DD8452", "#55A868")
LAYOUTS = (
    # (label, mrope_section, interleaved, theta)
    ("Qwen2-VL chunked [16, 24, 24], theta 1e6", (16, 24, 24), False, 1e6),
    ("Qwen3-VL interleaved [24, 20, 20], theta 5e6", (24, 20, 20), True, 5e6),
)


def wavelengths(theta: float, n: int) -> list[float]:
    """Rotary wavelength in positions, ``2*pi / inv_freq_i`` with ``inv_freq_i = theta**(-2i/D)``."""
    return [2 * math.pi * theta ** (2 * i / HEAD_DIM) for i in range(n)]


def main() -> None:
    n = HEAD_DIM // 2
    fig, (ax_cells, ax_wave) = plt.subplots(
        2, 1, figsize=(11, 5.6), sharex=True, gridspec_kw={"height_ratios": [1.1, 1.6]}, constrained_layout=True
    )
    for row, (_label, section, interleaved, _theta) in enumerate(LAYOUTS):
        axis = mrope_axis_of_frequency(section, interleaved=interleaved).tolist()
        assert len(axis) == n, (section, len(axis))
        y = len(LAYOUTS) - 1 - row
        for i, a in enumerate(axis):
            ax_cells.add_patch(plt.Rectangle((i - 0.5, y - 0.4), 1, 0.8, color=COLORS[a], ec="white", lw=0.6))
            ax_cells.text(i, y, AXES[a], ha="center", va="center", fontsize=6, color="white")
    ax_cells.set_ylim(-0.6, len(LAYOUTS) - 0.4)
    ax_cells.set_yticks(range(len(LAYOUTS)), [label for label, *_ in reversed(LAYOUTS)], fontsize=8)
    ax_cells.set_title("Which position axis drives each rotary frequency (head_dim 128, 64 frequencies)")
    ax_cells.legend(
        handles=[Patch(color=c, label=f"{a} ({name})") for a, c, name in zip(AXES, COLORS, ("time", "height", "width"))],
        loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=8, frameon=False,
    )  # fmt: skip
    for spine in ("top", "right", "left"):
        ax_cells.spines[spine].set_visible(False)

    for (_label, _section, _interleaved, theta), style in zip(LAYOUTS, ("--", "-")):
        ax_wave.plot(range(n), wavelengths(theta, n), style, color="0.25", lw=1.4, label=f"theta {theta:.0e}")
    # Mark each frequency by its axis: hollow squares chunked, dots interleaved. Chunked T covers only
    # the fast (left) end and W only the slow (right) end; interleaved T/H/W each span the whole range.
    for (_label, section, interleaved, theta), marker in zip(LAYOUTS, ("s", "o")):
        axis = mrope_axis_of_frequency(section, interleaved=interleaved).tolist()
        waves = wavelengths(theta, n)
        layout = "interleaved" if interleaved else "chunked"
        for a, color in enumerate(COLORS):
            idx = [i for i in range(n) if axis[i] == a]
            ax_wave.scatter(
                idx, [waves[i] for i in idx], s=16, marker=marker, zorder=3, label=f"{AXES[a]} ({layout})",
                color=color if interleaved else "none", edgecolors=color,
            )  # fmt: skip
            span = f"{AXES[a]} {layout}: {min(waves[i] for i in idx):.0e}..{max(waves[i] for i in idx):.0e}"
            print(f"  {span} positions")
    ax_wave.set_yscale("log")
    ax_wave.set_xlim(-0.7, n - 0.3)
    ax_wave.set_xlabel("frequency index i  (inv_freq_i = theta^(-2i/128): fast on the left, slow on the right)")
    ax_wave.set_ylabel("wavelength 2*pi / inv_freq (positions)")
    ax_wave.grid(True, which="major", alpha=0.3)
    ax_wave.legend(fontsize=7, ncol=4, loc="upper left")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=150)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
