"""``vl-train``: run a TOML training recipe with command-line overrides and report where the outputs went.

Usage::

    vl-train demo_s0                                   # a packaged recipe (vl_train/recipes/demo_s0.toml)
    vl-train my_recipe.toml --set train.lr=1e-4 --set data.size=200 --output runs/x
    vl-train demo_s1 --init-from runs/demo_s0          # start from a previous stage's output

A recipe has a top-level ``preset`` (a stage of :mod:`vl_train.stages`, default ``"custom"``) and three
sections; every key is checked and an unknown one is an error that names it and lists the known ones:

- ``[model]``: ``init_from`` / ``checkpoint`` (a folder holding ``config.json`` + safetensors, or a
  previous run's output folder with ``model/`` in it), else a fresh model from the inline tables
  ``[model.text]`` / ``[model.vision]`` (``VLTextConfig`` / ``VLVisionConfig`` fields; the vocabulary
  comes from the tokenizer); ``tokenizer = "demo"`` (:mod:`vl_train.demo_tokenizer`) or a tokenizer
  folder; image budgets ``min_pixels`` / ``max_pixels``, video ``fps`` / ``max_frames``; ``seed``.
- ``[data]``: one source (``kind = "synthetic"`` with ``size``/``tasks``/``image_size_range``/
  ``video_frames``/``thinking``/``grid``, or ``kind = "jsonl"`` with ``path``) or ``[data.sources.NAME]``
  tables with a ``ratio`` each (a :class:`~vl_train.data.mixture.MixtureSampler`); ``policy`` and
  ``overlong`` for bad and overlong samples; ``seed``.
- ``[train]``: :class:`~vl_train.config.TrainConfig` fields applied on top of the preset.

``--set section.key=value`` parses ``value`` as a TOML value (``1e-4``, ``true``, ``[1, 2]``), else as a
string. The run writes what the trainer writes (checkpoints, ``metrics.jsonl``, the loss-curve PNG) and
the final model as ``OUTPUT/model`` (``save_pretrained``), which the next stage's ``init_from`` reads.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import TrainConfig
from .stages import stage

if TYPE_CHECKING:
    from .data.mixture import MixtureSampler
    from .data.stream import PackedStream

__all__ = [
    "MODEL_KEYS",
    "build_data",
    "build_mixture",
    "build_model",
    "build_processor",
    "check_keys",
    "load_recipe",
    "main",
    "resolve_config",
    "weights_folder",
]

_TOP = {"preset", "description", "model", "data", "train", "teacher"}
MODEL_KEYS = {
    "init_from",
    "checkpoint",
    "tokenizer",
    "text",
    "vision",
    "seed",
    "min_pixels",
    "max_pixels",
    "fps",
    "max_frames",
}
_SOURCE = {
    "kind",
    "path",
    "size",
    "split",
    "seed",
    "tasks",
    "image_size_range",
    "video_frames",
    "thinking",
    "grid",
    "ratio",
}
_DATA = (_SOURCE - {"ratio"}) | {"sources", "policy", "overlong", "shuffle_buffer"}
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
}
_TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 8,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0],
}


def check_keys(where: str, given: Mapping[str, Any], known: set[str]) -> None:
    """Raise a ``ValueError`` naming every key of ``given`` outside ``known`` (and listing the known ones)."""
    bad = sorted(set(given) - known)
    if bad:
        raise ValueError(f"unknown keys {bad} in {where}; known keys are {sorted(known)}")


def packaged_recipes(package: str = "vl_train") -> list[str]:
    """Names of the recipes shipped in ``<package>/recipes`` (``vl_rl`` ships its own)."""
    folder = resources.files(package).joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str, package: str = "vl_train") -> dict[str, Any]:
    """Read a recipe file, or a packaged recipe by name (``"demo_s0"`` or ``"demo_s0.toml"``).

    Raises:
        FileNotFoundError: Neither a file nor a packaged recipe (the packaged ones are listed).
    """
    path = Path(name_or_path)
    if path.is_file():
        return tomllib.loads(path.read_text(encoding="utf-8"))
    name = name_or_path if name_or_path.endswith(".toml") else f"{name_or_path}.toml"
    packaged = resources.files(package).joinpath("recipes").joinpath(name)
    if packaged.is_file():
        return tomllib.loads(packaged.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"no recipe file {name_or_path!r} and no packaged recipe of that name; packaged: {packaged_recipes(package)}"
    )


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else kept as strings).

    Raises:
        ValueError: An override without ``=`` or without a section.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = key.strip().split(".")
        if len(parts) == 1:
            out[parts[0]] = value
            continue
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return out


def check_recipe(recipe: Mapping[str, Any]) -> None:
    """Reject unknown keys anywhere in a recipe (``[train]`` is checked by ``TrainConfig``)."""
    check_keys("the recipe", recipe, _TOP)
    check_keys("[model]", recipe.get("model", {}), MODEL_KEYS)
    data = recipe.get("data", {})
    check_keys("[data]", data, _DATA)
    for name, source in dict(data.get("sources", {})).items():
        check_keys(f"[data.sources.{name}]", source, _SOURCE)
    mixed = sorted(k for k in data if k in _SOURCE and k != "seed") if "sources" in data else []
    if mixed:
        raise ValueError(f"[data] keys {mixed} describe a single source but [data.sources] is given: move them there")


def resolve_config(recipe: Mapping[str, Any], output: str | None = None) -> TrainConfig:
    """The recipe's ``TrainConfig``: its ``preset`` with ``[train]`` (and ``output``) applied."""
    check_recipe(recipe)
    preset = str(recipe.get("preset", "custom"))
    base = TrainConfig() if preset == "custom" else stage(preset)
    train = dict(recipe.get("train", {}))
    if output is not None:
        train["output_dir"] = output
    return base.replace(**train)


def build_processor(model_section: Mapping[str, Any], patch_size: int, merge_size: int, temporal: int) -> Any:
    """The processor: the demo tokenizer (``tokenizer = "demo"``) or ``AutoTokenizer`` from a folder."""
    from .demo_tokenizer import make_demo_processor

    kwargs = {k: model_section[k] for k in ("min_pixels", "max_pixels", "fps", "max_frames") if k in model_section}
    processor = make_demo_processor(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal, **kwargs
    )
    tokenizer = model_section.get("tokenizer", "demo")
    if tokenizer != "demo":
        from transformers import AutoTokenizer

        processor.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return processor


def weights_folder(path: str) -> Path:
    """The folder holding ``config.json`` + weights: ``path`` itself or a vl-train run's ``path/model``."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no model in {folder}: expected {folder}/config.json or {folder}/model/config.json "
        "(the final model a vl-train run writes); run the previous stage first or pass --init-from"
    )


def build_model(model_section: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(model, processor)`` from a ``[model]`` section (see the module docstring)."""
    from vl_model import VLConfig, VLForConditionalGeneration

    source = model_section.get("init_from") or model_section.get("checkpoint")
    if source:
        model = VLForConditionalGeneration.from_pretrained(str(weights_folder(str(source))))
        vision = model.config.vision_config
        processor = build_processor(
            model_section, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )
        return model, processor
    vision_cfg = {**_TINY_VISION, **dict(model_section.get("vision", {}))}
    processor = build_processor(
        model_section, vision_cfg["patch_size"], vision_cfg["spatial_merge_size"], vision_cfg["temporal_patch_size"]
    )
    tok = processor.tokenizer
    text_cfg = {**_TINY_TEXT, **dict(model_section.get("text", {}))}
    text_cfg.setdefault("vocab_size", -(-len(tok) // 64) * 64)
    text_cfg.setdefault("eos_token_id", tok.eos_token_id)
    text_cfg.setdefault("pad_token_id", tok.pad_token_id)
    vision_cfg.setdefault("out_hidden_size", text_cfg["hidden_size"])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in _TOKEN_IDS.items()}
    config = VLConfig(text_config=text_cfg, vision_config=vision_cfg, **ids)
    torch.manual_seed(int(model_section.get("seed", 0)))
    return VLForConditionalGeneration(config), processor


_TOKEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _source(spec: Mapping[str, Any], default_seed: int) -> Any:
    kind = spec.get("kind", "synthetic")
    if kind == "synthetic":
        from .data.synthetic import SyntheticDataset

        kw = {k: spec[k] for k in ("size", "split", "tasks", "thinking", "grid") if k in spec}
        for key in ("image_size_range", "video_frames"):
            if key in spec:
                kw[key] = tuple(spec[key])
        return SyntheticDataset(seed=int(spec.get("seed", default_seed)), **kw)
    if kind == "jsonl":
        from .data.format import JsonlDataset

        if "path" not in spec:
            raise ValueError("a jsonl data source needs a path")
        return JsonlDataset(spec["path"])
    raise ValueError(f"unknown data source kind {kind!r}; kinds are ['synthetic', 'jsonl']")


def build_mixture(data_section: Mapping[str, Any], config: TrainConfig) -> MixtureSampler:
    """The ``[data]`` section's samples: one source or a mixture of ``[data.sources.NAME]`` by ratio (endless)."""
    from .data.mixture import MixtureSampler

    seed = int(data_section.get("seed", config.seed))
    specs = dict(data_section.get("sources", {})) or {"data": {k: v for k, v in data_section.items() if k in _SOURCE}}
    sources = {name: _source(spec, seed) for name, spec in specs.items()}
    ratios = {name: float(spec.get("ratio", 1.0)) for name, spec in specs.items()}
    return MixtureSampler(sources, ratios, seed=seed, shuffle_buffer=int(data_section.get("shuffle_buffer", 1000)))


def build_data(data_section: Mapping[str, Any], processor: Any, config: TrainConfig) -> PackedStream:
    """An endless, checkpointable stream of training batches: mixture -> chat rendering -> packing (or padding).

    Its ``state_dict()`` goes into the trainer's checkpoints, so a resumed run continues the data exactly.
    """
    from .data.render import SampleRenderer
    from .data.stream import PackedStream

    mixture = build_mixture(data_section, config)
    thinking = {"auto": None, "on": True, "off": False}[config.thinking]
    renderer = SampleRenderer(
        processor,
        max_length=config.max_length,
        overlong=data_section.get("overlong", "drop"),
        policy=data_section.get("policy", "fail"),
        thinking=thinking,
    )
    return PackedStream(
        mixture,
        renderer,
        max_length=config.max_length,
        pad_token_id=int(processor.tokenizer.pad_token_id),
        rows_per_batch=config.micro_batch_size,
        packing=config.packing,
    )


def _check_teacher(recipe: Mapping[str, Any], config: TrainConfig) -> bool:
    """Whether the recipe distils (preset Distill); its ``[teacher]`` section is checked (unknown keys named)."""
    from .distill_run import teacher_spec
    from .stages import distill_spec

    if config.stage != "Distill":
        if "teacher" in recipe:
            raise ValueError(f"[teacher] is only used with preset = 'Distill', not {config.stage!r}")
        return False
    if "teacher" not in recipe:
        raise ValueError("preset 'Distill' needs a [teacher] section with model = the teacher's folder")
    teacher_spec(dict(recipe["teacher"]), distill_spec(config))
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vl-train", description="Run a vl-train TOML recipe.")
    parser.add_argument(
        "recipe", nargs="?", help=f"a recipe file or a packaged recipe name ({', '.join(packaged_recipes())})"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="output folder (overrides train.output_dir)")
    parser.add_argument("--init-from", help="start from this model folder or previous run's output")
    parser.add_argument("--dry-run", action="store_true", help="build everything and print the config, no training")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes and stage presets")
    return parser


def _report(output_dir: Path, result: Any) -> None:
    print(f"vl-train: stopped after {getattr(result, 'steps', '?')} steps ({getattr(result, 'stopped_reason', '?')})")
    losses = list(getattr(result, "losses", []) or [])
    if losses:
        print(f"vl-train: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"vl-train: outputs in {output_dir.resolve()}")
    print(f"  final model: {(output_dir / 'model').resolve()}")
    for pattern, what in (("metrics*.jsonl", "metrics"), ("*.png", "loss curve"), ("checkpoint*", "checkpoint")):
        for path in sorted(output_dir.glob(pattern)) + sorted(output_dir.glob(f"*/{pattern}")):
            if "model" not in path.parts[-2:-1]:
                print(f"  {what}: {path.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vl-train`` / ``python -m vl_train``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list:
        from .stages import STAGES

        print("packaged recipes:", ", ".join(packaged_recipes()))
        print("stage presets:", ", ".join(STAGES))
        return 0
    if not args.recipe:
        _parser().print_usage(sys.stderr)
        return 2
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.init_from:
            recipe.setdefault("model", {})["init_from"] = args.init_from
        config = resolve_config(recipe, args.output)
        distilling = _check_teacher(recipe, config)
        model, processor = build_model(recipe.get("model", {}))
        batches = None if distilling else build_data(recipe.get("data", {}), processor, config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vl-train: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"vl-train: recipe {args.recipe} (preset {config.stage}), {sum(p.numel() for p in model.parameters())} parameters"
    )
    if args.dry_run:
        print(config)
        return 0
    from .trainer import Trainer

    try:  # Trainer (and DistillTrainer) freeze every part outside config.trainable
        if batches is None:
            from .distill_run import run_distill

            result = run_distill(recipe, config, model, processor)
        else:
            result = Trainer(model, config, batches).train()
    except (ValueError, FileNotFoundError) as exc:  # e.g. an unwritable output directory, before any training
        print(f"vl-train: error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(getattr(result, "output_dir", None) or config.output_dir)
    model.save_pretrained(str(output_dir / "model"))
    _report(output_dir, result)
    return 0
