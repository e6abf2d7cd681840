"""Property-based tests of the JSONL reader: any bytes, any JSON, fast, one-line DataErrors, policy obeyed.

Every line is either a sample (a dict with ``_source``) or a :class:`DataError` naming ``file:line``
on one line; ``policy="skip"`` never raises and counts exactly the lines it left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _budget import PROPERTY, within_budget
from _data_helpers import text_sample
from hypothesis import given
from hypothesis import strategies as st

from vl_train.data.format import DataError, DataStats, JsonlDataset, validate_sample, write_jsonl

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)
MEDIA = st.sampled_from(
    [
        "a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/png;base64,@@",
        "data:,x",
        "data:image/png",
        5,
        None,
        [1],
    ]
)


@st.composite
def near_samples(draw: st.DrawFn) -> dict[str, Any]:
    """Samples with one part replaced by something odd (the reader must name it or pass it on)."""
    sample: dict[str, Any] = text_sample(draw(st.text(max_size=5)))
    kind = draw(st.sampled_from(["image", "video", "fps", "role", "content", "extra", "id"]))
    user = sample["messages"][1]
    if kind == "image":
        user["content"] = [{"type": "image", "image": draw(MEDIA)}, {"type": "text", "text": "q"}]
    elif kind == "video":
        user["content"] = [{"type": "video", "video": draw(st.lists(MEDIA, max_size=3) | MEDIA)}]
    elif kind == "fps":
        user["content"] = [{"type": "video", "video": ["a.png"], "fps": draw(JSON)}]
    elif kind == "role":
        user["role"] = draw(JSON)
    elif kind == "content":
        user["content"] = draw(JSON)
    elif kind == "id":
        sample["id"] = draw(JSON)
    else:
        sample[draw(st.text(max_size=4))] = draw(JSON)
    return sample


LINE = st.one_of(
    st.binary(max_size=60),
    JSON.map(lambda v: json.dumps(v).encode()),
    near_samples().map(lambda s: json.dumps(s).encode()),
    st.just(json.dumps(text_sample("fine")).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


def _write(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines) + b"\n")
    return path


@PROPERTY
@given(lines=st.lists(LINE, min_size=1, max_size=8))
def test_any_file_yields_samples_or_one_line_errors(tmp_path_factory: Any, lines: list[bytes]) -> None:
    path = _write(tmp_path_factory.mktemp("jsonl"), lines)
    stats = DataStats()
    kept = within_budget(list, JsonlDataset(path, policy="skip", stats=stats))
    numbers = [int(s["_source"].rsplit(":", 1)[1]) for s in kept]
    assert numbers == sorted(numbers) and all(isinstance(s, dict) for s in kept)
    blank = sum(1 for line in lines if not line.replace(b"\n", b" ").replace(b"\r", b" ").strip())
    assert len(kept) + stats["skipped_bad_line"] + stats["skipped_invalid"] + blank == len(lines)
    for message in stats.examples.get("skipped_bad_line", []) + stats.examples.get("skipped_invalid", []):
        assert f"{path}:" in message and "\n" not in message and len(message) < 500
    try:
        strict = within_budget(list, JsonlDataset(path))
    except DataError as exc:
        assert f"{path}:" in str(exc) and "\n" not in str(exc)
    else:
        assert [s["_source"] for s in strict] == [s["_source"] for s in kept]


@PROPERTY
@given(value=JSON)
def test_validate_sample_raises_only_data_errors(value: Any) -> None:
    for candidate in (value, {"id": "x", "messages": value}, text_sample() | {"messages": [value]}):
        try:
            within_budget(validate_sample, candidate)
        except DataError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 500


@PROPERTY
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=4), inline=st.booleans())
def test_text_samples_round_trip(tmp_path_factory: Any, texts: list[str], inline: bool) -> None:
    samples = [text_sample(f"s{i}", answer=t or "a", question=t + "?") for i, t in enumerate(texts)]
    path = write_jsonl(samples, tmp_path_factory.mktemp("rt") / "rt.jsonl", inline_media=inline)
    back = list(JsonlDataset(path))
    assert [{k: v for k, v in s.items() if k != "_source"} for s in back] == samples
