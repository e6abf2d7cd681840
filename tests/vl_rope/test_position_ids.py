"""get_rope_index: parity with transformers, a plain-Python walk of REFERENCE.md, packing, decoding, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from _mm_sequences import IMAGE, PAD, VIDEO, VISION_END, VISION_START, Batch, oracle, random_batch

from vl_rope import decode_position_ids, get_packed_rope_index, get_rope_index

STYLES = ["qwen3_vl", "glm4v", "qwen2_vl", "qwen2_5_vl"]


def _ours(b: Batch, style: str, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    extra = {"second_per_grid_ts": b.second_per_grid_ts, "tokens_per_second": 2} if style == "qwen2_5_vl" else {}
    return get_rope_index(
        b.input_ids,
        image_grid_thw=b.image_grid_thw,
        video_grid_thw=b.video_grid_thw,
        attention_mask=b.attention_mask,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        style=style,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _walk(b: Batch, style: str, advance: str = "extent", m: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """REFERENCE.md section 1, one token run at a time in plain Python (independent of transformers)."""
    images = [] if b.image_grid_thw is None else b.image_grid_thw.tolist()
    videos: list[tuple[list[int], float]] = []
    for v, g in enumerate([] if b.video_grid_thw is None else b.video_grid_thw.tolist()):
        step = 2 * float(b.second_per_grid_ts[v]) if style == "qwen2_5_vl" else 1.0  # type: ignore[index]
        split = style in ("qwen3_vl", "glm4v")
        videos.extend([([1, g[1], g[2]], step)] * g[0] if split else [(g, step)])
    it = {1: iter([(g, 1.0) for g in images]), 2: iter(videos)}
    batch, width = b.input_ids.shape
    out = torch.zeros(3, batch, width, dtype=torch.long)
    deltas = []
    for r in range(batch):
        cols = [c for c in range(width) if b.attention_mask[r, c]]
        kinds = [int(b.mm_token_type_ids[r, c]) for c in cols]
        p, at, values = 0, 0, []
        for kind, group in itertools.groupby(kinds):
            n = len(list(group))
            if kind == 0:
                values += [(p + i, p + i, p + i) for i in range(n)]
                p += n
            else:
                (t, h, w), step = next(it[kind])
                run = [
                    (p + int(ti * torch.tensor(step, dtype=torch.float32)), p + hi, p + wi)
                    for ti in range(t)
                    for hi in range(h // m)
                    for wi in range(w // m)
                ]
                assert len(run) == n
                values += run
                p = p + max(h, w) // m if advance == "extent" else max(max(v) for v in run) + 1
            at += n
        for c, v in zip(cols, values, strict=True):
            out[:, r, c] = torch.tensor(v)
        deltas.append(max(max(v) for v in values) + 1 - len(cols) if values else 0)
    return out, torch.tensor(deltas)[:, None]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_equals_transformers(style: str, padding: str) -> None:
    pytest.importorskip("transformers")
    ref = oracle(style, tokens_per_second=2)
    for seed in range(40):
        b = random_batch(seed, split_videos=style in ("qwen3_vl", "glm4v"), padding=padding, batch=1 + seed % 4)
        if style == "qwen2_5_vl":
            want = ref.get_rope_index(
                b.input_ids,
                b.mm_token_type_ids,
                b.image_grid_thw,
                b.video_grid_thw,
                b.second_per_grid_ts,
                b.attention_mask,
            )
        else:
            want = ref.get_rope_index(
                b.input_ids, b.mm_token_type_ids, b.image_grid_thw, b.video_grid_thw, b.attention_mask
            )
        for mm in (b.mm_token_type_ids, None):  # modality given, or read from the token ids
            got = _ours(b, style, mm_token_type_ids=mm)
            assert torch.equal(got[0], want[0]), (style, seed)
            assert torch.equal(got[1], want[1]), (style, seed)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("advance", ["extent", "max_position"])
def test_equals_reference_walk(style: str, advance: str) -> None:
    for seed in range(25):
        b = random_batch(100 + seed, split_videos=style in ("qwen3_vl", "glm4v"), padding="left", max_t=5)
        got = _ours(b, style, vision_advance=advance)
        want = _walk(b, style, advance)
        assert torch.equal(got[0], want[0]), (style, advance, seed)
        assert torch.equal(got[1], want[1]), (style, advance, seed)


def test_advances_differ_only_for_long_qwen2_videos() -> None:
    ids = torch.tensor([[1, VISION_START] + [VIDEO] * 8 + [VISION_END, 2]])
    grid = torch.tensor([[8, 2, 2]])  # 8 temporal patches of one merged token each
    extent, _ = get_rope_index(ids, video_grid_thw=grid, style="qwen2_vl", vision_advance="extent")
    maxpos, _ = get_rope_index(ids, video_grid_thw=grid, style="qwen2_vl", vision_advance="max_position")
    assert extent[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 4]
    assert maxpos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_glm_video_frames_written_with_the_image_token() -> None:
    glm_img, v_start, v_end, b_img, e_img = 151343, 151341, 151342, 151339, 151340
    frame = [b_img, glm_img, e_img]  # one merged token per 2x2-patch frame
    ids = torch.tensor([[5, b_img, glm_img, e_img, v_start, 7, *frame, 8, *frame, v_end, 9]])
    types = torch.zeros_like(ids)
    types[0, 2], types[0, 7], types[0, 11] = 1, 2, 2
    kw = {"image_grid_thw": torch.tensor([[1, 2, 2]]), "video_grid_thw": torch.tensor([[2, 2, 2]]), "style": "glm4v"}
    from_ids = get_rope_index(ids, **kw)  # type: ignore[arg-type]
    given = get_rope_index(ids, mm_token_type_ids=types, **kw)  # type: ignore[arg-type]
    assert torch.equal(from_ids[0], given[0])


def test_text_only_and_empty_rows() -> None:
    ids = torch.tensor([[PAD, PAD, 3, 4, 5], [PAD] * 5])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0] * 5])
    pos, deltas = get_rope_index(ids, attention_mask=mask)
    assert pos[:, 0].tolist() == [[0, 0, 0, 1, 2]] * 3 and pos[:, 1].abs().sum() == 0
    assert deltas.tolist() == [[0], [0]]


def test_packed_rows_restart_per_sample() -> None:
    samples = [random_batch(200 + i, batch=1, padding="right", text_only_rows=False) for i in range(3)]
    ids = torch.cat([s.input_ids[0][s.attention_mask[0].bool()] for s in samples])[None]
    grids = {
        key: torch.cat([getattr(s, key) for s in samples if getattr(s, key) is not None])
        for key in ("image_grid_thw", "video_grid_thw")
        if any(getattr(s, key) is not None for s in samples)
    }
    lengths = [int(s.attention_mask.sum()) for s in samples]
    segment_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = get_packed_rope_index(ids, segment_ids=segment_ids, **grids)  # type: ignore[arg-type]
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    assert torch.equal(get_packed_rope_index(ids[0], cu_seqlens=cu, **grids), packed[:, 0])  # type: ignore[arg-type]
    start = 0
    for s, n in zip(samples, lengths, strict=True):
        alone, _ = get_rope_index(
            s.input_ids,
            attention_mask=s.attention_mask,
            image_grid_thw=s.image_grid_thw,
            video_grid_thw=s.video_grid_thw,
        )
        assert torch.equal(packed[:, 0, start : start + n], alone[:, 0, :n])
        start += n


def test_bad_cu_seqlens() -> None:
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        get_packed_rope_index(ids)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        get_packed_rope_index(ids, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="ends at 9 but input_ids hold 8"):
        get_packed_rope_index(ids, cu_seqlens=torch.tensor([0, 4, 9]))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_decode_continues_the_prompt(padding: str) -> None:
    """Positions of generated tokens from deltas equal get_rope_index over prompt + generated text."""
    b = random_batch(7, batch=3, padding=padding)
    _, deltas = _ours(b, "qwen3_vl")
    new = 4
    full_ids = torch.cat((b.input_ids, torch.full((3, new), 42)), 1)
    full_mask = torch.cat((b.attention_mask, torch.ones(3, new, dtype=torch.long)), 1)
    full_mm = torch.cat((b.mm_token_type_ids, torch.zeros(3, new, dtype=torch.long)), 1)
    full = Batch(full_ids, full_mask, full_mm, b.image_grid_thw, b.video_grid_thw, None)
    want, _ = _ours(full, "qwen3_vl")
    by_mask = decode_position_ids(deltas, attention_mask=full_mask, num_new=new)
    assert torch.equal(by_mask, want[:, :, -new:])
    if padding == "right":  # without a mask, positions count from the real prompt length
        for r in range(3):
            n = int(b.attention_mask[r].sum())
            step = decode_position_ids(deltas[r : r + 1], past_length=n, num_new=1)
            assert int(step[0, 0, 0]) == int(want[0, r, b.input_ids.shape[1]])


# ---------------------------------------------------------------- bad input


def _row(*grid_tokens: int) -> torch.Tensor:
    row = [1, 2]
    for n in grid_tokens:
        row += [VISION_START] + [IMAGE] * n + [VISION_END]
    return torch.tensor([[*row, 3]])


@pytest.mark.parametrize(
    ("ids", "grid", "match"),
    [
        (_row(4, 4), torch.tensor([[1, 4, 4]]), "input_ids hold 2 runs of image tokens but image_grid_thw describes 1"),
        (_row(4), torch.tensor([[1, 4, 4], [1, 2, 2]]), "hold 1 runs of image tokens but image_grid_thw describes 2"),
        (_row(5), torch.tensor([[1, 4, 4]]), r"has 5 tokens but image_grid_thw\[0\].*needs t\*h\*w/merge\^2 = 4"),
        (
            _row(4),
            torch.tensor([[1, 4, 5]]),
            r"image_grid_thw\[0\] = \[1, 4, 5\]: h = 4 and w = 5 must both be divisible",
        ),
        (_row(4), torch.tensor([[0, 4, 4]]), r"image_grid_thw\[0\] = \[0, 4, 4\]: every grid size"),
        (_row(4), torch.tensor([[1, -4, 4]]), "must be positive"),
        (_row(4), torch.tensor([1, 4, 4]), r"must have shape \[n, 3\]"),
        (_row(4), torch.tensor([[1.0, 4.0, 4.0]]), "must hold integers"),
        (_row(4), None, "input_ids hold 1 runs of image tokens but image_grid_thw is None"),
    ],
)
def test_bad_grids(ids: torch.Tensor, grid: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_rope_index(ids, image_grid_thw=grid)


def test_bad_videos_and_shapes() -> None:
    ids = torch.tensor([[1, VISION_START, VIDEO, VISION_END, 2]])
    with pytest.raises(ValueError, match="describes 1 videos with 2 temporal patches in all"):
        get_rope_index(ids, video_grid_thw=torch.tensor([[2, 2, 2]]))
    with pytest.raises(ValueError, match="needs tokens_per_second"):
        get_rope_index(ids, video_grid_thw=torch.tensor([[1, 2, 2]]), style="qwen2_5_vl")
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 values but video_grid_thw describes 1"):
        get_rope_index(
            ids,
            video_grid_thw=torch.tensor([[1, 2, 2]]),
            style="qwen2_5_vl",
            tokens_per_second=2,
            second_per_grid_ts=[1.0, 2.0],
        )
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\) but input_ids has \(1, 5\)"):
        get_rope_index(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\]"):
        get_rope_index(ids[0])
    with pytest.raises(ValueError, match="found 3"):
        get_rope_index(ids, mm_token_type_ids=torch.tensor([[0, 0, 3, 0, 0]]))
    with pytest.raises(ValueError, match="unknown style"):
        get_rope_index(ids, style="qwen4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"deltas must be \[B, 1\]"):
        decode_position_ids(torch.zeros(3), past_length=1)
