"""The adapter-transfer example (``examples/adapter_transfer``): a smoke run, and unit tests of its pieces.

Pieces: the two tokenizers and the id re-mapping (and its error), moving an LM to another tokenizer
(the same network), the pixel decoder of the text view, frozen parts bit-identical after adapter
training, the filtered-SFT selection, and the report.
"""

from __future__ import annotations

import importlib.util
import json
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from at_cells import CELLS_PROMPT, CellListing, TextView, cell_words, sample_images, to_text_view
from at_models import (
    CellNoise,
    changed_parameters,
    compose_cell_embeddings,
    fingerprint,
    fresh_adapter,
    new_language_model,
    new_tower,
    smoke_model,
    swap_checked,
    vision_ids,
)
from at_recipe import ADAPTER, Parts, RecipeSettings, load_parts, save_parts
from at_report import accuracy_table, gain, mean_std, write_report
from at_stages import SFTSpec, score_items, synthetic_sources, train_sft, wrong_items
from at_tokens import (
    CELL_WORDS,
    MODEL_TOKENS,
    make_processor,
    make_tokenizer,
    special_ids,
    token_map,
    transfer_language_model,
)

from vl_model import compose
from vl_train.data import SampleRenderer, SyntheticDataset, verify
from vl_train.data._shapes import COLOURS, KINDS, Scene, Shape

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "adapter_transfer"

TINY = smoke_model()


def _run_module() -> Any:
    """``examples/adapter_transfer/run.py`` under its own name (the demo's ``run`` module is another file)."""
    spec = importlib.util.spec_from_file_location("adapter_transfer_run", EXAMPLE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toks() -> tuple[Any, Any]:
    return make_tokenizer("instruct"), make_tokenizer("reasoning")


@pytest.fixture(scope="module")
def procs(toks: tuple[Any, Any]) -> tuple[Any, Any]:
    return tuple(make_processor(t, patch_size=8, max_pixels=TINY.max_pixels) for t in toks)  # type: ignore[return-value]


def _samples(n: int, split: str = "heldout", thinking: float = 0.0) -> list[dict[str, Any]]:
    return list(
        SyntheticDataset(
            split,  # type: ignore[arg-type]
            size=n,
            seed=3,
            tasks=["count", "colour", "compare"],
            image_size_range=TINY.image_size_range,
            thinking=thinking,
            grid=TINY.grid,
        )
    )


def _composed(processor: Any, seed: int = 0) -> Any:
    lm = new_language_model(TINY, processor.tokenizer, seed)
    return compose(new_tower(TINY, seed), lm, **vision_ids(processor.tokenizer))


# ---------------------------------------------------------------------------------------------- smoke run


@pytest.mark.filterwarnings("ignore:.*had no learning signal:RuntimeWarning")  # smoke-sized GRPO: all rewards 0
def test_smoke_run_reports_every_stage_over_two_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_module()
    out = tmp_path / "at"
    start = time.perf_counter()
    assert run.main(["--smoke", "--output", str(out), "--no-progress"]) == 0
    assert time.perf_counter() - start < 60

    report = (out / "report.md").read_text()
    for label in run.LABELS.values():
        assert f"| {label} |" in report
    for row in ("instruct LLM alone, text view", "reasoning LLM alone, text view", "majority answer", "chance"):
        assert f"| {row}" in report
    assert "| stage | count | colour | compare | mean |" in report
    assert "- E (whole recipe) over the baseline: " in report and "over 2 seeds" in report
    assert "image_token_id" in report and "bit-identical" in report

    results = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in results["seeds"]] == [0, 1]
    for seed in results["seeds"]:
        assert list(seed["scores"]) == ["baseline", "A", "B", "C", "D", "E"]
        assert all(0.0 <= v <= 1.0 for scores in seed["scores"].values() for v in scores.values())
        assert all(old != new for old, new in seed["remapped"].values())  # every id moved to the new tokenizer
    assert (out / "settings.json").is_file()
    assert f"adapter_transfer: report {(out / 'report.md').resolve()}" in capsys.readouterr().out


def test_bad_arguments_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_module()
    with pytest.raises(SystemExit):
        run.parse_args(["--eval-size", "0"])
    assert "--eval-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--seeds", "1", "1"])
    assert "--seeds must be distinct" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- tokenizers


def test_the_two_tokenizers_share_words_not_ids(toks: tuple[Any, Any]) -> None:
    instruct, reasoning = toks
    assert len(reasoning) > len(instruct)
    text = "<|im_start|>user\nHow many red stars are there?<|im_end|><c:red_star><|image_pad|><think>"
    for tok in toks:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    a, b = (special_ids(t) for t in toks)
    assert set(a) == set(MODEL_TOKENS) and all(a[k] != b[k] for k in a)
    pairs = token_map(instruct, reasoning)
    assert len(pairs) == len(instruct) - 1  # every token but <unk> is shared
    assert sum(s != t for s, t in pairs.items()) > 0.9 * len(pairs)
    assert all(w in reasoning.get_vocab() for w in CELL_WORDS)


def test_a_missing_token_is_an_error_naming_the_field(toks: tuple[Any, Any]) -> None:
    with pytest.raises(KeyError, match=r"image_token_id \('<\|img\|>'\)"):
        special_ids(toks[0], {"image_token_id": "<|img|>", "eos_token_id": "<|im_end|>"})
    with pytest.raises(ValueError, match="tokenizer kind"):
        make_tokenizer("chat")


def test_a_language_model_moved_to_the_other_tokenizer_is_the_same_network(toks: tuple[Any, Any]) -> None:
    instruct, reasoning = toks
    lm = new_language_model(TINY, instruct, seed=1)
    moved = transfer_language_model(lm, instruct, reasoning).eval()
    text = "<|im_start|>user\n<|vision_start|><c:blue_star><c:empty><|vision_end|>What colour is the star?<|im_end|>"
    a = torch.tensor([instruct(text, add_special_tokens=False)["input_ids"]])
    b = torch.tensor([reasoning(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        la, lb = lm.eval()(input_ids=a).logits, moved(input_ids=b).logits
    pairs = token_map(instruct, reasoning)
    src = torch.tensor(sorted(pairs))
    torch.testing.assert_close(lb[..., [pairs[int(s)] for s in src]], la[..., src], rtol=1e-5, atol=1e-5)
    assert moved.config.eos_token_id == reasoning.convert_tokens_to_ids("<|im_end|>")
    assert moved.generation_config.eos_token_id == moved.config.eos_token_id


def test_swap_remaps_and_checks_every_id(procs: tuple[Any, Any]) -> None:
    instruct, reasoning = procs
    model = _composed(instruct)
    new_lm = transfer_language_model(model.language_model, instruct.tokenizer, reasoning.tokenizer)
    remapped = swap_checked(model, new_lm, reasoning)
    want = special_ids(reasoning.tokenizer)
    assert remapped == {k: (special_ids(instruct.tokenizer)[k], want[k]) for k in want}
    for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(model.config, field) == want[field]
    # generate() and the RL rollouts stop on the generation config's eos: it must be the new tokenizer's
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (
        want["eos_token_id"],
        want["pad_token_id"],
    )
    batch = SampleRenderer(reasoning)(_samples(1)[0]).as_batch()  # type: ignore[union-attr]
    with torch.no_grad():
        model.forward_hidden(**{k: v for k, v in batch.items() if k != "labels"})


def test_swap_to_a_tokenizer_without_the_placeholder_fails_before_swapping(procs: tuple[Any, Any]) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    instruct, reasoning = procs
    model = _composed(instruct)
    old_lm = model.language_model
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>"])}
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    new_lm = transfer_language_model(old_lm, instruct.tokenizer, reasoning.tokenizer)
    with pytest.raises(KeyError, match="image_token_id"):
        swap_checked(model, new_lm, types.SimpleNamespace(tokenizer=bare))
    assert model.language_model is old_lm
    new_lm.config.eos_token_id = 3  # an LM whose config does not match its tokenizer
    with pytest.raises(ValueError, match="eos_token_id is 3"):
        swap_checked(model, new_lm, reasoning)
    assert model.language_model is old_lm


def test_cell_rows_start_composed_and_train_with_noise_on_cells_only(toks: tuple[Any, Any]) -> None:
    tok = toks[0]
    lm = new_language_model(TINY, tok, seed=2)
    compose_cell_embeddings(lm, tok)
    table = lm.get_input_embeddings()
    row = lambda word: table.weight[tok.convert_tokens_to_ids(word)]
    torch.testing.assert_close(row("<c:blue_star>"), row("blue") + row("star"))
    ids = torch.tensor([[tok.convert_tokens_to_ids(w) for w in ("<c:blue_star>", "star", "<c:empty>", "blue")]])
    clean = table(ids)
    with CellNoise(lm, tok, 0.5, seed=0):
        table.train()
        noisy = table(ids)
        table.eval()
        assert torch.equal(table(ids), clean)  # no noise outside training
    assert torch.equal(table.train()(ids), clean)  # the hook is gone after the block
    moved = (noisy - clean).norm(dim=-1)[0]
    assert bool(moved[0] > 0) and bool(moved[2] > 0) and moved[1] == 0 and moved[3] == 0


def test_saved_parts_come_back_and_refuse_other_settings(tmp_path: Path, procs: tuple[Any, Any]) -> None:
    instruct, reasoning = procs
    settings = RecipeSettings(model=TINY)
    lm = new_language_model(TINY, instruct.tokenizer, 0)
    parts = Parts(
        new_tower(TINY, 0),
        lm,
        transfer_language_model(lm, instruct.tokenizer, reasoning.tokenizer),
        instruct,
        reasoning,
        ceilings={"instruct": {"count": 0.5}},
        seconds={"V0 tower": 1.0},
    )
    save_parts(parts, settings, tmp_path / "parts.pt")
    back = load_parts(settings, tmp_path / "parts.pt")
    for name in ("tower", "instruct_lm", "reasoning_lm"):
        want, got = getattr(parts, name).state_dict(), getattr(back, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert back.ceilings == parts.ceilings and back.reasoning_lm.generation_config.eos_token_id == 25
    other = RecipeSettings(model=TINY, cell_noise=0.1)
    with pytest.raises(ValueError, match=r"built with other settings \(\['cell_noise'\]\)"):
        load_parts(other, tmp_path / "parts.pt")


# ---------------------------------------------------------------------------------------------- text view


def test_cell_words_reads_every_kind_and_colour_at_every_size() -> None:
    grid = 32
    for colour in COLOURS:
        for kind in KINDS:
            for size in range(8, grid - 1):
                scene = Scene(2 * grid, grid, grey=40, noise=6, noise_seed=size, grid=grid)
                scene.shapes.append(Shape(kind, colour, grid + (grid - size) // 2, 1, size))
                assert cell_words(scene.render(), grid) == ["<c:empty>", f"<c:{colour}_{kind}>"], (colour, kind, size)


def test_cell_words_rejects_scenes_it_cannot_read() -> None:
    image = PIL.Image.new("RGB", (32, 32), (40, 40, 40))
    with pytest.raises(ValueError, match="does not split into 24 px cells"):
        cell_words(image, 24)
    pixels = np.full((32, 32, 3), 40, dtype=np.uint8)
    pixels[2:6, 2:6], pixels[10:14, 10:14] = COLOURS["red"], COLOURS["blue"]
    with pytest.raises(ValueError, match=r"cell at \(0, 0\) holds colours \['red', 'blue'\]"):
        cell_words(PIL.Image.fromarray(pixels), 32)


def test_the_text_view_counts_like_the_answers() -> None:
    """Independent check of the decoder: the count answers recomputed from the decoded cells."""
    samples = [s for s in _samples(60) if s["task"] == "count"]
    for sample in samples:
        words = [w for image in sample_images(sample) for w in cell_words(image, TINY.grid)]
        question = sample["messages"][0]["content"][-1]["text"].split()
        what = question[2]  # "How many <kind>s ..." or "How many <colour> shapes ..."
        if what in COLOURS:
            hits = sum(w.startswith(f"<c:{what}_") for w in words)
        else:
            hits = sum(w.endswith(f"_{what[:-1]}>") for w in words)
        assert hits == sample["answer"], sample["id"]


def test_the_cell_listing_names_every_cell_row_by_row() -> None:
    images = _samples(6)
    listing = CellListing(images, TINY.grid)
    assert len(listing) == len(images)
    for source in images:
        sample = listing[images.index(source)]
        image = sample_images(source)[0]
        words = cell_words(image, TINY.grid)
        assert sample["messages"][0]["content"][0]["image"] is image
        assert sample["messages"][0]["content"][1]["text"] == CELLS_PROMPT
        answer = sample["messages"][1]["content"][0]["text"]
        rows = answer.rstrip(".").split("; ")
        assert len(rows) == image.height // TINY.grid
        named = [cell for row in rows for cell in row.split(", ")]
        assert named == [w[3:-1].replace("_", " ") for w in words]


def test_the_text_view_keeps_the_layout_and_labels(procs: tuple[Any, Any]) -> None:
    processor = procs[0]
    renderer = SampleRenderer(processor)
    for sample in _samples(6, "train", thinking=0.5):
        rendered = renderer(sample)
        assert rendered is not None
        view = TextView(renderer, TINY.grid)(sample)
        assert view is not None and view.pixel_values is None and view.image_grid_thw is None
        assert torch.equal(view.labels, rendered.labels)
        pads = rendered.input_ids == processor.image_token_id
        assert torch.equal(view.input_ids[~pads], rendered.input_ids[~pads])
        cells = [processor.tokenizer.convert_tokens_to_ids(w) for w in CELL_WORDS]
        assert torch.isin(view.input_ids[pads], torch.tensor(cells)).all()
    with pytest.raises(ValueError, match="image placeholders but"):
        to_text_view(rendered, _samples(1)[0] | {"messages": [{"role": "user", "content": []}]}, processor, TINY.grid)


# ---------------------------------------------------------------------------------------------- stages


def test_adapter_training_leaves_tower_and_llm_bit_identical(tmp_path: Path, procs: tuple[Any, Any]) -> None:
    processor = procs[0]
    model = _composed(processor)
    fresh_adapter(model.visual, seed=5)
    frozen, adapter = fingerprint(model, ("vision", "llm")), fingerprint(model, ADAPTER)
    sources, ratios = synthetic_sources({"count": 1.0, "colour": 1.0}, TINY, size=16, seed=0, thinking=0.0)
    spec = SFTSpec("A", 2, 1e-2, ADAPTER, warmup_steps=0, micro_batch_size=2, max_length=256)
    train_sft(model, processor, sources, ratios, spec, TINY.grid, tmp_path, seed=0, progress=False)
    assert changed_parameters(frozen, model, ("vision", "llm")) == []
    assert len(changed_parameters(adapter, model, ADAPTER)) == len(adapter)  # every adapter tensor trained
    assert all(p.requires_grad for p in model.parameters())  # unfrozen for the next stage
    # the check sees a one-ulp change of one LLM weight
    weight = model.language_model.lm_head.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    assert changed_parameters(frozen, model, ("vision", "llm")) == ["language_model.lm_head.weight"]


def test_fresh_adapter_resets_only_the_adapter_and_depends_on_the_seed() -> None:
    model = _composed(make_processor(make_tokenizer("instruct"), patch_size=8, max_pixels=TINY.max_pixels))
    blocks = fingerprint(model, ("vision", "llm"))
    first = fingerprint(fresh_adapter(model.visual, 1) and model, ADAPTER)
    assert fingerprint(fresh_adapter(model.visual, 1) and model, ADAPTER) == first
    assert fingerprint(fresh_adapter(model.visual, 2) and model, ADAPTER) != first
    assert changed_parameters(blocks, model, ("vision", "llm")) == []


def test_filtered_sft_takes_exactly_the_items_answered_wrong(procs: tuple[Any, Any]) -> None:
    processor = procs[0]
    model = _composed(processor).eval()
    pool = _samples(9, "train")
    scores = score_items(model, processor, pool, max_new_tokens=3)
    from demo_eval import generate_answers

    answers = generate_answers(model, processor, pool, max_new_tokens=3, thinking=False)
    assert scores == [verify(s, a) for s, a in zip(pool, answers, strict=True)]
    picked = wrong_items(pool[:4], [1.0, 0.0, 0.5, 1.0])
    assert [s["id"] for s in picked] == [pool[1]["id"], pool[2]["id"]]
    assert wrong_items(pool, scores) == [s for s, sc in zip(pool, scores, strict=True) if sc < 1.0]
    with pytest.raises(ValueError, match="9 samples but 4 scores"):
        wrong_items(pool, [1.0, 0.0, 0.5, 1.0])


# ---------------------------------------------------------------------------------------------- report


def test_report_gives_mean_and_spread_and_judges_gains(tmp_path: Path) -> None:
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)
    before = [{"count": 0.1, "colour": 0.2}, {"count": 0.2, "colour": 0.2}, {"count": 0.1, "colour": 0.3}]
    after = [{"count": 0.9, "colour": 0.8}, {"count": 0.8, "colour": 0.9}, {"count": 0.9, "colour": 0.9}]
    table = accuracy_table(
        [("before", before), ("after", after), ("chance", [{"count": 0.1, "colour": 0.2}])], ["count", "colour"]
    )
    assert "| stage | count | colour | mean |" in table
    assert "| before | 13.3 ± 5.8 | 23.3 ± 5.8 | 18.3 ± 2.9 |" in table
    assert "| chance | 10.0 | 20.0 | 15.0 |" in table
    up = gain("after over before", after, before)
    assert up.mean == pytest.approx((0.7 + 0.65 + 0.7) / 3) and up.above_noise is True
    assert up.line().endswith("(+70.0, +65.0, +70.0): gain above the seed noise")
    noisy = gain("noise", [{"count": 0.5}, {"count": 0.3}], [{"count": 0.4}, {"count": 0.4}])
    assert noisy.above_noise is False and noisy.line().endswith("within the seed noise")
    down = gain("down", before, after)
    assert down.above_noise is False and down.verdict == "loss above the seed noise"
    # near the bar: per-seed changes -0.1 and -0.2 (mean -0.15, std 0.071) are a loss; -0.1 and +0.1 are not
    small = gain("small", [{"count": 0.3}, {"count": 0.2}], [{"count": 0.4}, {"count": 0.4}])
    assert small.verdict == "loss above the seed noise"
    assert gain("mixed", [{"count": 0.3}, {"count": 0.5}], [{"count": 0.4}, {"count": 0.4}]).verdict == (
        "within the seed noise"
    )
    assert gain("one", after[:1], before[:1]).above_noise is None
    with pytest.raises(ValueError, match="no score for tasks \\['colour'\\]"):
        accuracy_table([("bad", [{"count": 0.5}])], ["count", "colour"])
    with pytest.raises(ValueError, match="3 seeds after but 2 before"):
        gain("x", after, before[:2])
    path = write_report(
        tmp_path / "r" / "report.md", title="T", intro="I", table=table, gains=[up], times={"A": 1.5}, notes=["n"]
    )
    text = path.read_text()
    assert text.startswith("# T\n") and table in text and up.line() in text and "| A | 2 |" in text and "- n" in text
