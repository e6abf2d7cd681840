"""Sample format: validation, JSONL round trip with file and base64 media, locations, DataStats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import image, image_sample, text_sample, video_sample

from vl_train.data.format import DataError, DataStats, HFDataset, JsonlDataset, load_image, validate_sample, write_jsonl


def test_validate_accepts_the_documented_format() -> None:
    for sample in (text_sample(), image_sample(reasoning="r", answer="x"), video_sample()):
        assert validate_sample(sample) is sample


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.update(id=3), "'id' must be a string"),
        (lambda s: s["messages"].append({"role": "robot", "content": "x"}), "role 'robot'"),
        (lambda s: s.update(messages=[s["messages"][1]]), "no assistant message"),
        (lambda s: s["messages"][1].update(content=[{"type": "audio", "audio": 1}]), "item 0"),
        (lambda s: s["messages"][2].update(content=[{"type": "image", "image": "a.png"}]), "only user messages"),
        (lambda s: s.update(reasoning=5), "'reasoning' must be a string"),
    ],
)
def test_validate_names_the_problem(change, needle: str) -> None:  # type: ignore[no-untyped-def]
    sample = text_sample("bad-1")
    change(sample)
    with pytest.raises(DataError, match=needle):
        validate_sample(sample)


@pytest.mark.parametrize("inline", [False, True])
def test_jsonl_round_trip(tmp_path: Path, inline: bool) -> None:
    samples = [text_sample("a"), image_sample("b", img=image(20, 12, seed=5)), video_sample("c", n_frames=3)]
    path = write_jsonl(samples, tmp_path / "data.jsonl", inline_media=inline)
    back = list(JsonlDataset(path))
    assert [s["id"] for s in back] == ["a", "b", "c"]
    assert [s["_source"] for s in back] == [f"{path}:{n}" for n in (1, 2, 3)]
    ref = back[1]["messages"][0]["content"][0]["image"]
    assert isinstance(ref, bytes) if inline else Path(ref).is_absolute()
    got = np.asarray(load_image(ref, back[1]))
    assert np.array_equal(got, np.asarray(image(20, 12, seed=5)))
    assert len(back[2]["messages"][0]["content"][0]["video"]) == 3
    assert back[2]["messages"][0]["content"][0]["fps"] == 2.0
    # lazily re-iterable: a second pass gives the same samples
    assert [s["id"] for s in JsonlDataset(path)] == ["a", "b", "c"]


def test_jsonl_bad_line_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(text_sample("ok")) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        list(JsonlDataset(path))
    with pytest.raises(FileNotFoundError, match="no such JSONL"):
        JsonlDataset(tmp_path / "nope.jsonl")


def test_load_image_errors_name_sample_and_location(tmp_path: Path) -> None:
    sample = image_sample("img-7") | {"_source": "x.jsonl:4"}
    with pytest.raises(DataError, match=r"sample 'img-7' at x\.jsonl:4: .*missing or corrupt"):
        load_image(str(tmp_path / "gone.png"), sample)
    with pytest.raises(DataError, match="img-7"):
        load_image(b"\x89PNG not really", sample)


def test_stats_count_report_merge_and_state() -> None:
    a, b = DataStats(max_examples=1), DataStats()
    a.add("skipped_bad_media", "s1")
    a.add("skipped_bad_media", "s2")
    b.add("truncated", "t")
    a.merge(b)
    assert a["skipped_bad_media"] == 2 and a["truncated"] == 1 and a["other"] == 0
    assert a.report() == "skipped_bad_media: 2\n  - s1\ntruncated: 1\n  - t"
    c = DataStats()
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert c.report() == a.report()


def test_hf_dataset_source() -> None:
    datasets = pytest.importorskip("datasets")
    rows = [text_sample("h0"), text_sample("h1")]
    ds = datasets.Dataset.from_list(rows)
    got = list(HFDataset(ds, name="toy"))
    assert [s["id"] for s in got] == ["h0", "h1"] and got[1]["_source"] == "hf:toy[1]"
    streamed = list(HFDataset(ds.to_iterable_dataset(), name="toy"))
    assert [s["id"] for s in streamed] == ["h0", "h1"]


def _line_with(field: str, value: object) -> dict:
    """A valid JSONL sample with one video (or image) field replaced."""
    sample = {
        "id": "bad",
        "task": "t",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video", "video": ["f.png"], "fps": 2.0}, {"type": "text", "text": "q"}],
            },
            {"role": "assistant", "content": "a"},
        ],
    }
    item = sample["messages"][0]["content"][0]  # type: ignore[index]
    if field == "image":
        item.clear()
        item.update(type="image", image=value)
    else:
        item[field] = value
    return sample


MALFORMED_LINES = [
    (
        json.dumps(_line_with("image", "data:image/png;base64,@@not base64@@")).encode(),
        r"content\[0\]\.image: .*base64",
    ),
    (json.dumps(_line_with("image", "data:image/png;base64")).encode(), r"content\[0\]\.image: data URL has no ','"),
    (json.dumps(_line_with("image", "data:image/png,rawbytes")).encode(), r"content\[0\]\.image: only base64"),
    (json.dumps(_line_with("video", ["a.png", "data:,x"])).encode(), r"content\[0\]\.video\[1\]: only base64"),
    (json.dumps(_line_with("fps", "abc")).encode(), r"'fps' must be a positive finite number, got 'abc'"),
    (json.dumps(_line_with("fps", [1])).encode(), r"'fps' must be a positive finite number, got \[1\]"),
    (json.dumps(_line_with("fps", True)).encode(), r"'fps' must be a positive finite number, got True"),
    (json.dumps(_line_with("fps", float("nan"))).encode(), r"'fps' must be a positive finite number, got nan"),
    (json.dumps(_line_with("fps", float("inf"))).encode(), r"'fps' must be a positive finite number, got inf"),
    (b"[" * 50_000 + b"]" * 50_000, r"not valid JSON: nested deeper|deeper than 32"),
    (b'{"id": "deep", "answer": ' + b"[" * 40 + b"]" * 40 + b"}", r"deeper than 32 levels"),
    (b'{"id": "x", "task": "caf\xe9"}', r"line is not UTF-8 text: byte 0xe9 at column 25"),
    (b"[1, 2]", r"a line must hold one JSON object \(a sample\), got list"),
    (b"null", r"a line must hold one JSON object \(a sample\), got NoneType"),
    (b'"just text"', r"got str"),
    (b'{"id": 1' + b"0" * 5000 + b"}", r"not valid JSON"),  # beyond Python's int digit limit
    (b"{not json", r"not valid JSON"),
]


@pytest.mark.parametrize(("line", "needle"), MALFORMED_LINES, ids=range(len(MALFORMED_LINES)))
def test_every_malformed_line_is_a_one_line_error_with_its_location(tmp_path: Path, line: bytes, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps(text_sample("ok")).encode()
    path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    with pytest.raises(DataError) as info:
        list(JsonlDataset(path))
    message = str(info.value)
    assert f"{path}:2: " in message and "\n" not in message and len(message) < 400
    assert re.search(needle, message), message
    stats = DataStats()
    kept = list(JsonlDataset(path, policy="skip", stats=stats))
    assert [s["_source"] for s in kept] == [f"{path}:1", f"{path}:3"]
    assert stats["skipped_bad_line"] + stats["skipped_invalid"] == 1 and f"{path}:2" in stats.report()


def test_skip_policy_shares_the_renderers_stats_and_rejects_unknown_policies(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"null\n" + json.dumps(text_sample("x") | {"id": 3}).encode() + b"\n\xff\n")
    stats = DataStats()
    assert list(JsonlDataset(path, policy="skip", stats=stats)) == []
    assert stats.counts == {"skipped_bad_line": 2, "skipped_invalid": 1}
    assert list(JsonlDataset(path, validate=False, policy="skip")) == [
        text_sample("x") | {"id": 3, "_source": f"{path}:2"}
    ]
    with pytest.raises(ValueError, match="policy"):
        JsonlDataset(path, policy="ignore")  # type: ignore[arg-type]


def test_byte_order_mark_and_crlf_lines_are_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(text_sample("a")).encode() + b"\r\n" + json.dumps(text_sample("b")).encode()
    )
    assert [s["id"] for s in JsonlDataset(path)] == ["a", "b"]


@pytest.mark.parametrize("fps", ["30", [2], float("nan"), -1.0, 0, False])
def test_validate_rejects_bad_fps_by_name(fps: object) -> None:
    sample = video_sample("v")
    sample["messages"][0]["content"][0]["fps"] = fps
    with pytest.raises(DataError, match=r"sample 'v': message 0 item 0: 'fps' must be a positive finite number"):
        validate_sample(sample)


def test_prompt_only_samples_need_a_user_turn_not_an_answer() -> None:
    prompt = text_sample("q-1")
    prompt["messages"] = [m for m in prompt["messages"] if m["role"] != "assistant"]
    with pytest.raises(DataError, match="no assistant message"):
        validate_sample(prompt)
    assert validate_sample(prompt, prompt_only=True) is prompt
    prompt["messages"] = [m for m in prompt["messages"] if m["role"] != "user"]
    with pytest.raises(DataError, match=r"'q-1'.*no user message"):
        validate_sample(prompt, prompt_only=True)


def test_jsonl_rewrite_keeps_file_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # samples read from one JSONL (media paths made absolute) and written to another keep pointing at the
    # same files; a relative path is relative to the working directory it was given in
    first = write_jsonl(
        [image_sample("a", img=image(20, 12, seed=5)), video_sample("v", n_frames=2)], tmp_path / "a.jsonl"
    )
    monkeypatch.chdir(tmp_path)
    loaded = list(JsonlDataset(first))
    loaded[0]["messages"][0]["content"][0]["image"] = str(
        Path(loaded[0]["messages"][0]["content"][0]["image"]).relative_to(tmp_path)
    )
    again = list(JsonlDataset(write_jsonl(loaded, tmp_path / "out" / "b.jsonl")))
    assert np.array_equal(
        np.asarray(load_image(again[0]["messages"][0]["content"][0]["image"], again[0])),
        np.asarray(image(20, 12, seed=5)),
    )
    frames = again[1]["messages"][0]["content"][0]["video"]
    assert frames == loaded[1]["messages"][0]["content"][0]["video"] and all(Path(f).is_file() for f in frames)
