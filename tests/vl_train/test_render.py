"""Chat rendering: assistant-only labels (checked by decoding), thinking formats, bad media, overlong samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _data_helpers import image, image_sample, make_processor, supervised_text, text_sample, video_sample

from vl_train.data.format import DataError, DataStats, JsonlDataset, write_jsonl
from vl_train.data.render import IGNORE_INDEX, SampleRenderer


@pytest.fixture(scope="module")
def processor() -> Any:
    return make_processor()


def _sup(processor: Any, out: Any) -> str:
    return supervised_text(processor.tokenizer, out.input_ids, out.labels)


def test_text_labels_are_the_answer_and_end_of_turn(processor: Any) -> None:
    out = SampleRenderer(processor)(text_sample(answer="yes"))
    assert out is not None
    # non-thinking: the empty think block is in the input but not supervised
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nyes<|im_end|>" in processor.tokenizer.decode(out.input_ids)
    assert _sup(processor, out) == "yes<|im_end|>"
    assert out.labels[0] == IGNORE_INDEX and out.num_labels == 2
    supervised = out.labels != IGNORE_INDEX
    assert torch.equal(out.labels[supervised], out.input_ids[supervised])


def test_thinking_format_supervises_reasoning(processor: Any) -> None:
    sample = image_sample(answer="a red square", reasoning="it is red\nand square")
    out = SampleRenderer(processor)(sample)
    assert out is not None
    assert _sup(processor, out) == "<think>\nit is red\nand square\n</think>\n\na red square<|im_end|>"
    # forcing the non-thinking format drops the reasoning from input and labels
    plain = SampleRenderer(processor, thinking=False)(sample)
    assert plain is not None and "it is red" not in processor.tokenizer.decode(plain.input_ids)
    assert _sup(processor, plain) == "a red square<|im_end|>"
    # forcing thinking without reasoning supervises the (empty) block too
    forced = SampleRenderer(processor, thinking=True)(text_sample(answer="no"))
    assert forced is not None and _sup(processor, forced) == "<think>\n\n</think>\n\nno<|im_end|>"


def test_media_tokens_and_multi_turn(processor: Any) -> None:
    sample = {
        "id": "m",
        "task": "compare",
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image(16, 16)}, {"type": "text", "text": "what"}]},
            {"role": "assistant", "content": "a cat"},
            {
                "role": "user",
                "content": [{"type": "image", "image": image(32, 16, 1)}, {"type": "text", "text": "and"}],
            },
            {"role": "assistant", "content": "a dog"},
        ],
    }
    out = SampleRenderer(processor)(sample)
    assert out is not None and out.image_grid_thw is not None and out.pixel_values is not None
    assert out.image_grid_thw.tolist() == [[1, 4, 4], [1, 8, 4]]
    assert out.pixel_values.shape[0] == 16 + 32
    image_id = processor.image_token_id
    assert int((out.input_ids == image_id).sum()) == 4 + 8
    assert torch.equal(out.mm_token_type_ids, (out.input_ids == image_id).long())
    # both assistant turns are supervised; the placeholders shifted nothing
    assert _sup(processor, out) == "a cat<|im_end|>a dog<|im_end|>"
    video = SampleRenderer(processor)(video_sample(answer="a cat at 1 seconds"))
    assert video is not None and video.video_grid_thw is not None
    assert int((video.mm_token_type_ids == 2).sum()) == int(video.video_grid_thw.prod() // 4)
    assert _sup(processor, video) == "a cat at 1 seconds<|im_end|>"


def test_bad_image_fail_names_sample_and_line(processor: Any, tmp_path: Path) -> None:
    path = write_jsonl([text_sample("t0"), image_sample("i1"), image_sample("i2")], tmp_path / "d.jsonl")
    (tmp_path / "d_media" / "1_0_0.png").unlink()  # sample i1's image goes missing
    (tmp_path / "d_media" / "2_0_0.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    renderer = SampleRenderer(processor, policy="fail")
    rows = iter(JsonlDataset(path))
    assert renderer(next(rows)) is not None
    with pytest.raises(DataError, match=rf"sample 'i1' at {path}:2: .*missing or corrupt"):
        renderer(next(rows))
    with pytest.raises(DataError, match=rf"sample 'i2' at {path}:3"):
        renderer(next(rows))


def test_bad_image_skip_counts(processor: Any, tmp_path: Path) -> None:
    path = write_jsonl([image_sample("i0"), image_sample("i1"), text_sample("t2")], tmp_path / "d.jsonl")
    (tmp_path / "d_media" / "1_0_0.png").write_bytes(b"")
    stats = DataStats()
    kept = list(SampleRenderer(processor, policy="skip", stats=stats).iter(JsonlDataset(path)))
    assert [s.sample_id for s in kept] == ["i0", "t2"]
    assert stats["skipped_bad_media"] == 1 and stats["rendered"] == 2 and stats["seen"] == 3
    assert f"{path}:2" in stats.report()
    bad = text_sample("x") | {"messages": [{"role": "user", "content": "hi"}]}
    assert SampleRenderer(processor, policy="skip", stats=stats)(bad) is None
    assert stats["skipped_invalid"] == 1


def test_overlong_drop_and_truncate(processor: Any) -> None:
    long = text_sample("long", answer="yes " * 20)
    full = SampleRenderer(processor)(long)
    assert full is not None
    stats = DataStats()
    assert SampleRenderer(processor, max_length=30, overlong="drop", stats=stats)(long) is None
    assert stats["dropped_overlong"] == 1 and "> max_length 30" in stats.report()
    cut = SampleRenderer(processor, max_length=len(full) - 5, overlong="truncate", stats=stats)(long)
    assert cut is not None and len(cut) == len(full) - 5 and stats["truncated"] == 1
    assert torch.equal(cut.input_ids, full.input_ids[: len(cut)]) and torch.equal(cut.labels, full.labels[: len(cut)])
    # a cut before any supervised token leaves nothing to learn: dropped and counted
    assert SampleRenderer(processor, max_length=10, overlong="truncate", stats=stats)(long) is None
    assert stats["dropped_no_labels"] == 1


def test_truncation_never_cuts_through_an_image(processor: Any) -> None:
    first = {"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "what"}]}
    second = {"role": "user", "content": [{"type": "image", "image": image(32, 32, 2)}, {"type": "text", "text": "b"}]}
    sample = {
        "id": "two",
        "task": "t",
        "messages": [first, {"role": "assistant", "content": "a cat"}, second, {"role": "assistant", "content": "a"}],
    }
    full = SampleRenderer(processor)(sample)
    assert full is not None and full.image_grid_thw is not None
    pads = torch.nonzero(full.mm_token_type_ids == 1).flatten()
    second_start = int(pads[4])  # the first image has 4 merged tokens
    stats = DataStats()
    inside = SampleRenderer(processor, max_length=second_start + 3, overlong="truncate", stats=stats)(sample)
    assert inside is None and stats["dropped_cut_media"] == 1 and "inside a image" in stats.report()
    before = SampleRenderer(processor, max_length=second_start - 1, overlong="truncate", stats=stats)(sample)
    assert before is not None and stats["truncated"] == 1
    assert before.image_grid_thw is not None and before.pixel_values is not None
    assert before.image_grid_thw.tolist() == [[1, 4, 4]] and before.pixel_values.shape[0] == 16
    assert int((before.mm_token_type_ids == 1).sum()) == 4
    assert _sup(processor, before) == "a cat<|im_end|>"


def test_bad_arguments(processor: Any) -> None:
    with pytest.raises(ValueError, match="overlong"):
        SampleRenderer(processor, overlong="cut")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy"):
        SampleRenderer(processor, policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        SampleRenderer(processor, max_length=0)


def _strip_markers(template: str) -> str:
    import re

    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


@pytest.mark.parametrize("thinking", [None, False, True])
def test_templates_without_generation_markers_label_turn_by_turn(processor: Any, thinking: bool | None) -> None:
    # our template with its {% generation %} markers removed must give exactly the same labels
    from vl_model import VLProcessor
    from vl_model.processing import has_generation_markers

    plain = VLProcessor(
        processor.image_processor,
        processor.video_processor,
        processor.tokenizer,
        _strip_markers(processor.chat_template),
    )
    assert has_generation_markers(processor.chat_template) and not has_generation_markers(plain.chat_template)
    conversation = {
        "id": "two-turns",
        "messages": [
            {"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": [{"type": "image", "image": image(16, 16)}, {"type": "text", "text": "what"}]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "and"},
            {"role": "assistant", "content": "a red square"},
        ],
        "reasoning": "it is red",
    }
    for sample in (conversation, image_sample(answer="no"), text_sample(answer="yes")):
        want = SampleRenderer(processor, thinking=thinking)(sample)
        got = SampleRenderer(plain, thinking=thinking)(sample)
        assert want is not None and got is not None and want.num_labels > 0
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels), sample["id"]


def test_an_official_style_template_labels_the_answers(tmp_path: Path) -> None:
    from vl_model import VLProcessor
    from vl_model.testing import INSTRUCT_TEMPLATE, make_tokenizer

    base = make_processor()
    official = VLProcessor(base.image_processor, base.video_processor, make_tokenizer(), INSTRUCT_TEMPLATE)
    sample = {
        "id": "o",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image(16, 16)}, {"type": "text", "text": "what is it"}],
            },
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "and the colour"},
            {"role": "assistant", "content": "grey"},
        ],
    }
    out = SampleRenderer(official)(sample)
    assert out is not None
    text = official.tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert supervised_text(official.tokenizer, out.input_ids, out.labels) == "a cat<|im_end|>grey<|im_end|>"


def test_a_sample_without_labelled_tokens_is_dropped_and_counted(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a template that marks nothing as the assistant's (e.g. markers around an empty block) leaves no label
    monkeypatch.setattr(type(processor), "render_conversation", lambda self, turns: (self._render(turns)[0], []))
    stats = DataStats()
    assert SampleRenderer(processor, policy="skip", stats=stats)(text_sample(answer="yes")) is None
    assert stats["dropped_no_labels"] == 1
    with pytest.raises(DataError, match="no assistant token to learn"):
        SampleRenderer(processor)(text_sample(answer="yes"))


def test_huge_text_is_dropped_before_tokenising(processor: Any) -> None:
    import time

    huge = text_sample("huge", answer="yes " * 500_000)  # 2 MB: seconds to tokenise
    stats = DataStats()
    renderer = SampleRenderer(processor, max_length=256, stats=stats)
    start = time.perf_counter()
    assert renderer(huge) is None
    assert time.perf_counter() - start < 1.0
    assert stats["dropped_overlong"] == 1 and "dropped before tokenising" in stats.report()
    one_word = text_sample("word", answer="x" * 2_000_000)
    start = time.perf_counter()
    assert renderer(one_word) is None and time.perf_counter() - start < 1.0


@pytest.mark.parametrize("words", [1, 20, 40, 60, 100, 200])
def test_early_drop_agrees_with_tokenising(processor: Any, words: int) -> None:
    # the character bound may only drop what tokenising would drop too
    sample = text_sample("s", answer=" ".join(["describe"] * words))
    full = SampleRenderer(processor)(sample)
    assert full is not None
    for max_length in (16, len(full) - 1, len(full)):
        early, late = DataStats(), DataStats()
        a = SampleRenderer(processor, max_length=max_length, stats=early)(sample)
        b = SampleRenderer(processor, max_length=max_length, stats=late, early_drop=False)(sample)
        assert (a is None) == (b is None) == (len(full) > max_length)
