"""The vl-train CLI, recipes (vl_train.recipe) and builders (vl_train.builders): overrides, unknown keys,
model and data building, and the S0 -> S1 -> SFT chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_helpers import write_recipe

from vl_train.builders import build_data, build_mixture, build_model
from vl_train.cli import main
from vl_train.recipe import apply_overrides, load_recipe, packaged_recipes, resolve_config
from vl_train.testing import SPECIAL_TOKENS, TINY_TEXT, TINY_VISION, make_demo_tokenizer, word_level_tokenizer

DEMOS = ["demo_s0", "demo_s1", "demo_sft"]


def test_packaged_recipes_resolve() -> None:
    assert set(DEMOS) <= set(packaged_recipes())
    configs = {name: resolve_config(load_recipe(name)) for name in DEMOS}
    assert [c.stage for c in configs.values()] == ["S0", "S1", "SFT"]
    assert configs["demo_s0"].trainable == ("merger", "deepstack")
    assert all(c.max_length == 512 and 30 <= c.max_steps <= 60 for c in configs.values())
    assert load_recipe("demo_s1.toml")["model"]["init_from"] == "runs/demo_s0"
    assert load_recipe("demo_sft")["model"]["init_from"] == "runs/demo_s1"
    with pytest.raises(FileNotFoundError, match="demo_s0"):
        load_recipe("no_such_recipe")


def test_overrides() -> None:
    recipe = apply_overrides(
        load_recipe("demo_s0"),
        [
            "optim.lr=1e-4",
            "data.size=20",
            "train.packing=false",
            "data.tasks=['count']",
            "train.output_dir=out/x",
            "model.text.hidden_size=32",
        ],
    )
    assert recipe["optim"]["lr"] == 1e-4 and recipe["data"]["size"] == 20 and recipe["data"]["tasks"] == ["count"]
    assert recipe["train"]["packing"] is False and recipe["train"]["output_dir"] == "out/x"
    assert recipe["model"]["text"]["hidden_size"] == 32 and recipe["model"]["text"]["num_hidden_layers"] == 2
    assert load_recipe("demo_s0")["optim"]["lr"] == 5e-3  # the loaded recipe is not modified
    config = resolve_config(recipe, output="elsewhere")
    assert config.optim.lr == 1e-4 and config.optim.warmup_steps == 3
    assert not config.packing and config.output_dir == "elsewhere"
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match=r"\['lr'\] are optimiser settings: put them in the \[optim\] section"):
        resolve_config(apply_overrides(load_recipe("demo_s0"), ["train.lr=1e-4"]))


@pytest.mark.parametrize(
    ("override", "named", "known"),
    [
        ("train.bogus=1", "bogus", "max_steps"),
        ("optim.lr_tower=1", "lr_tower", "lr_vision"),
        ("model.hidden=3", "hidden", "init_from"),
        ("data.sizes=3", "sizes", "image_size_range"),
        ("optimizer=3", "optimizer", "train"),
        ("data.sources.a.weight=1", "weight", "ratio"),
    ],
)
def test_unknown_keys_fail_by_name(override: str, named: str, known: str, capsys) -> None:
    assert main(["demo_s0", "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"'{named}'" in err and known in err


def test_dry_run_and_list(capsys) -> None:
    assert main(["demo_s0", "--dry-run", "--set", "data.size=8"]) == 0
    assert "preset S0" in capsys.readouterr().out
    assert main(["--list"]) == 0
    assert "demo_sft" in capsys.readouterr().out
    assert main(["demo_s1", "--dry-run", "--init-from", "/nonexistent/run"]) == 2
    assert "run the previous stage first" in capsys.readouterr().err


def test_demo_tokenizer_covers_synthetic_text() -> None:
    from vl_train.data.synthetic import SyntheticDataset

    tok = make_demo_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    words = chars = 0
    for sample in SyntheticDataset(size=18, seed=1, image_size_range=(48, 64), video_frames=(2, 3)):
        texts = [i["text"] for m in sample["messages"] for i in m["content"] if i["type"] == "text"]
        for text in [*texts, sample.get("reasoning") or ""]:
            enc = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in enc and tok.decode(enc) == text
            pieces = [p for p in tok.convert_ids_to_tokens(enc) if p.strip()]
            words += sum(len(p) > 1 for p in pieces)
            chars += sum(len(p) == 1 and p.isalpha() for p in pieces)
    assert words > 5 * chars  # the dataset's words are whole tokens


def test_word_level_tokenizer_ids_and_splits() -> None:
    # a special token listed in the vocabulary keeps its id; one missing from it takes the next free id
    pieces = ["<|im_end|>", "<unk>", " ", *"aeqrsu", "square", "squares"]
    tok = word_level_tokenizer({p: i for i, p in enumerate(pieces)}, ["<|im_end|>", "<|endoftext|>"])
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [0, len(pieces)]
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, len(pieces), 1)
    # longest word first; a word running on into letters ("squaresa") falls back to characters
    text = "squares square squaresa<|im_end|>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(enc) == [
        "squares", " ", "square", " ", *"squaresa", "<|im_end|>",
    ]  # fmt: skip
    assert tok.decode(enc) == text and tok.decode(enc, skip_special_tokens=True) == text.removesuffix("<|im_end|>")
    assert tok("x", add_special_tokens=False)["input_ids"] == [1]


def test_build_model_and_data() -> None:
    recipe = apply_overrides(load_recipe("demo_s0"), ["data.size=12", "train.max_length=384"])
    config = resolve_config(recipe)
    model, processor = build_model(recipe["model"])
    tok = processor.tokenizer
    assert model.config.text_config.vocab_size >= len(tok) and model.config.text_config.hidden_size == 64
    assert model.config.vision_config.patch_size == 8 and processor.image_processor.patch_size == 8
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    batches = build_data(recipe["data"], processor, config)
    for _ in range(3):  # an endless stream: more batches than the 12 samples fill
        batch = next(batches)
        assert batch["input_ids"].shape == (2, 384) and (batch["labels"] != -100).any()
        out = model(**batch)
        assert torch.isfinite(out.loss)


def test_synthetic_source_passes_the_grid() -> None:
    recipe = apply_overrides(
        load_recipe("demo_s0"),
        ["data.size=6", "data.tasks=['count']", "data.grid=32", "data.image_size_range=[64, 100]"],
    )
    mixture = build_mixture(recipe["data"], resolve_config(recipe))
    samples = [next(mixture) for _ in range(6)]
    sizes = {item["image"].size for s in samples for item in s["messages"][0]["content"] if item["type"] == "image"}
    assert len(sizes) > 1 and all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)


def test_init_from_loads_weights_and_processor(tmp_path: Path) -> None:
    text = {**TINY_TEXT, "hidden_size": 32, "intermediate_size": 64}
    model, processor = build_model({"tokenizer": "demo", "max_pixels": 9000, "text": text, "vision": TINY_VISION})
    model.save_pretrained(str(tmp_path / "run" / "model"))
    processor.save_pretrained(str(tmp_path / "run" / "model"))
    loaded, reloaded = build_model({"init_from": str(tmp_path / "run")})
    assert reloaded.image_processor.patch_size == 8 and reloaded.image_processor.max_pixels == 9000
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert build_model({"init_from": str(tmp_path / "run"), "max_pixels": 4096})[1].image_processor.max_pixels == 4096
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_recipe_file_with_sources(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path / "mix.toml",
        """
preset = "S1"
[model]
tokenizer = "demo"
max_pixels = 4096
[model.text]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
intermediate_size = 64
rope_parameters = { rope_type = "default", rope_theta = 10000.0, mrope_section = [4, 2, 2] }
[model.vision]
depth = 1
hidden_size = 32
intermediate_size = 64
num_heads = 2
patch_size = 8
deepstack_visual_indexes = [0]
[data.sources.vision]
kind = "synthetic"
size = 8
tasks = ["count"]
image_size_range = [48, 64]
ratio = 3
[data.sources.text]
kind = "synthetic"
size = 8
tasks = ["text_math"]
ratio = 1
[train]
max_length = 256
micro_batch_size = 1
""",
    )
    recipe = load_recipe(str(path))
    with pytest.raises(ValueError, match=r"\['size'\] describe a single source"):
        resolve_config(apply_overrides(recipe, ["data.size=3"]))
    config = resolve_config(recipe)
    assert config.stage == "S1" and config.max_length == 256
    _, processor = build_model(recipe["model"])
    batch = next(build_data(recipe["data"], processor, config))
    assert batch["input_ids"].shape == (1, 256)


def test_python_m_vl_train() -> None:
    done = subprocess.run([sys.executable, "-m", "vl_train", "--list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo_s0" in done.stdout


def test_demo_chain_s0_s1_sft(tmp_path: Path, capsys) -> None:
    quick = [
        "--set",
        "train.max_steps=3",
        "--set",
        "data.size=16",
        "--set",
        "train.save_every=0",
        "--set",
        "train.plot=false",
    ]
    runs = {name: tmp_path / name for name in DEMOS}
    assert main(["demo_s0", "--output", str(runs["demo_s0"]), *quick]) == 0
    assert main(["demo_s1", "--output", str(runs["demo_s1"]), "--init-from", str(runs["demo_s0"]), *quick]) == 0
    assert main(["demo_sft", "--output", str(runs["demo_sft"]), "--init-from", str(runs["demo_s1"]), *quick]) == 0
    out = capsys.readouterr().out
    for run in runs.values():
        assert (run / "model" / "config.json").is_file() and str(run.resolve()) in out
    # S0 trained only the merger: the LLM of S1's starting point is S0's (and the fresh model's)
    from vl_model import VLForConditionalGeneration

    s0 = VLForConditionalGeneration.from_pretrained(str(runs["demo_s0"] / "model"))
    s1 = VLForConditionalGeneration.from_pretrained(str(runs["demo_s1"] / "model"))
    fresh, _ = build_model(load_recipe("demo_s0")["model"])
    assert torch.equal(s0.lm_head.weight, fresh.lm_head.weight)
    assert not torch.equal(s0.model.visual.merger.linear_fc2.weight, fresh.model.visual.merger.linear_fc2.weight)
    assert not torch.equal(s1.lm_head.weight, s0.lm_head.weight)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.packing=yes", "TrainConfig key 'packing' must be true or false, got 'yes'"),
        ("train.max_steps=abc", "TrainConfig key 'max_steps' must be an integer, got 'abc'"),
        ("optim.betas=1", "[optim] key 'betas' must be a list, got 1"),
        ("data.size=abc", "[data] key 'size' must be an integer, got 'abc'"),
        ("data.policy=ignore", "[data] key 'policy' must be one of ['fail', 'skip'], got 'ignore'"),
        ("model.max_pixels=1.5", "[model] key 'max_pixels' must be an integer, got 1.5"),
        ("data.image_size_range=[64]", "[data] key 'image_size_range' must be a list of 2 values, got [64]"),
    ],
)
def test_set_type_errors_are_one_line_naming_the_key(override: str, message: str, capsys) -> None:
    assert main(["demo_s0", "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err


def test_data_counts_reach_metrics_and_the_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    quick = ["--set", "train.max_steps=2", "--set", "data.size=16", "--set", "train.plot=false"]
    assert (
        main(["demo_s0", "--output", str(out), "--set", "train.max_length=128", "--set", "data.overlong=drop", *quick])
        == 0
    )
    printed = capsys.readouterr().out
    import json

    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/seen"] >= last["data/rendered"] > 0 and last["data/dropped_overlong"] > 0
    assert f"dropped_overlong {last['data/dropped_overlong']}" in printed
    assert "samples not trained as given" in printed and "tokens > max_length 128" in printed


def test_bad_jsonl_lines_follow_the_recipe_policy(tmp_path: Path) -> None:
    from vl_train.data.format import write_jsonl
    from vl_train.data.synthetic import SyntheticDataset

    data = tmp_path / "data" / "train.jsonl"
    write_jsonl(list(SyntheticDataset(size=4, tasks=["count"], image_size_range=(48, 64))), data)
    with data.open("a") as f:
        f.write("this is not json\n[1, 2]\n")
    recipe = apply_overrides(load_recipe("demo_s0"), ["data.kind='jsonl'", f"data.path='{data.as_posix()}'"])
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k in ("kind", "path")}
    config = resolve_config(recipe, output=str(tmp_path / "out"))
    _, processor = build_model(recipe["model"])
    with pytest.raises(ValueError, match=r"train\.jsonl:5"):
        next(build_data(recipe["data"], processor, config))
    stream = build_data({**recipe["data"], "policy": "skip"}, processor, config)
    next(stream)
    next(stream)
    assert stream.stats["skipped_bad_line"] + stream.stats["skipped_invalid"] >= 2 and stream.stats["rendered"] >= 4
