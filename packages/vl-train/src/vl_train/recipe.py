"""TOML recipes: finding, reading, overriding and checking them (shared by ``vl-train`` and ``vl-rl``).

A recipe is a TOML file (or a packaged recipe addressed by name). Every section's keys are checked; an
unknown key is an error that names it and lists the known ones. ``--set section.key=value`` overrides
parse ``value`` as a TOML value (``1e-4``, ``true``, ``[1, 2]``) and else keep it as a string.

``vl-train`` recipes have a top-level ``preset`` (a stage of :mod:`vl_train.stages`, default ``"custom"``)
and the sections ``[model]``, ``[data]``, ``[optim]`` (:class:`~vl_train.config.OptimConfig`), ``[train]``
(:class:`~vl_train.config.TrainConfig`) and, for distillation, ``[teacher]``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .config import OptimConfig, TrainConfig, type_problem
from .stages import stage

__all__ = [
    "DATA_KEYS",
    "MODEL_KEYS",
    "SOURCE_KEYS",
    "apply_overrides",
    "check_keys",
    "check_no_optim_keys",
    "check_recipe",
    "load_recipe",
    "packaged_recipes",
    "resolve_config",
]

TOP_KEYS = {"preset", "description", "model", "data", "optim", "train", "teacher"}
MODEL_TYPES: dict[str, Any] = {
    "init_from": str,
    "tokenizer": str,
    "text": dict,
    "vision": dict,
    "seed": int,
    "min_pixels": int,
    "max_pixels": int,
    "fps": float,
    "max_frames": int,
}
MODEL_KEYS = set(MODEL_TYPES)
"""``[model]``: a checkpoint to start from or a fresh model's configs, the tokenizer, media budgets."""
SOURCE_TYPES: dict[str, Any] = {
    "kind": Literal["synthetic", "jsonl"],
    "path": str,
    "size": int,
    "split": str,
    "seed": int,
    "tasks": list[str],
    "image_size_range": tuple[int, int],
    "video_frames": tuple[int, int],
    "thinking": float,
    "grid": int,
    "ratio": float,
}
SOURCE_KEYS = set(SOURCE_TYPES)
"""Keys of one data source (``[data]`` itself or ``[data.sources.NAME]``)."""
DATA_TYPES: dict[str, Any] = {
    **{k: v for k, v in SOURCE_TYPES.items() if k != "ratio"},
    "sources": dict,
    "policy": Literal["fail", "skip"],
    "overlong": Literal["drop", "truncate"],
    "shuffle_buffer": int,
}
DATA_KEYS = set(DATA_TYPES)


def check_keys(where: str, given: Mapping[str, Any], known: set[str] | Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming every key of ``given`` outside ``known`` (and listing the known ones).

    With ``known`` a mapping of key -> type, a value of another type is an error naming the key too.
    """
    bad = sorted(set(given) - set(known))
    if bad:
        raise ValueError(f"unknown keys {bad} in {where}; known keys are {sorted(known)}")
    if isinstance(known, Mapping):
        for key, value in given.items():
            problem = type_problem(known[key], value)
            if problem is not None:
                raise ValueError(f"{where} key {key!r} must be {problem}, got {value!r}")


def _recipe_folders(package: str) -> list[Any]:
    folders = [resources.files(package).joinpath("recipes"), resources.files(package).joinpath("testing/recipes")]
    return [f for f in folders if f.is_dir()]


def packaged_recipes(package: str = "vl_train") -> list[str]:
    """Names of the recipes shipped with ``package`` (its ``recipes/`` and the demo ones in ``testing/recipes/``)."""
    return sorted(
        p.name[:-5] for folder in _recipe_folders(package) for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_recipe(name_or_path: str, package: str = "vl_train") -> dict[str, Any]:
    """Read a recipe file, or a packaged recipe by name (``"demo_s0"`` or ``"demo_s0.toml"``).

    Raises:
        FileNotFoundError: Neither a file nor a packaged recipe (the packaged ones are listed).
        ValueError: The file is not valid TOML (the parser's line and column named).
    """
    path = Path(name_or_path)
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        name = name_or_path if name_or_path.endswith(".toml") else f"{name_or_path}.toml"
        found = [f.joinpath(name) for f in _recipe_folders(package) if f.joinpath(name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no recipe file {name_or_path!r} and no packaged recipe of that name; "
                f"packaged: {packaged_recipes(package)}"
            )
        text, where = found[0].read_text(encoding="utf-8"), f"packaged recipe {name}"
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from exc


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else kept as strings).

    Raises:
        ValueError: An override without ``=`` or with an empty key.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return out


def check_recipe(recipe: Mapping[str, Any]) -> None:
    """Reject unknown keys anywhere in a ``vl-train`` recipe (``[train]`` / ``[optim]`` are checked by their configs)."""
    check_keys("the recipe", recipe, TOP_KEYS)
    check_keys("[model]", recipe.get("model", {}), MODEL_TYPES)
    data = recipe.get("data", {})
    check_keys("[data]", data, DATA_TYPES)
    for name, source in dict(data.get("sources", {})).items():
        check_keys(f"[data.sources.{name}]", source, SOURCE_TYPES)
    mixed = sorted(k for k in data if k in SOURCE_KEYS and k != "seed") if "sources" in data else []
    if mixed:
        raise ValueError(f"[data] keys {mixed} describe a single source but [data.sources] is given: move them there")


def check_no_optim_keys(where: str, section: Mapping[str, Any]) -> None:
    """A run section (``[train]``, ``[rl]``) must not hold optimiser settings, which belong in ``[optim]``.

    Raises:
        ValueError: Naming the misplaced keys.
    """
    misplaced = sorted(k for k in section if k in {f.name for f in dataclasses.fields(OptimConfig)} or k == "optim")
    if misplaced:
        raise ValueError(f"{where} keys {misplaced} are optimiser settings: put them in the [optim] section")


def resolve_config(recipe: Mapping[str, Any], output: str | None = None) -> TrainConfig:
    """The recipe's ``TrainConfig``: its ``preset`` with ``[train]``, ``[optim]`` (and ``output``) applied.

    Raises:
        ValueError: Unknown keys anywhere (named) or invalid values.
    """
    check_recipe(recipe)
    preset = str(recipe.get("preset", "custom"))
    base = TrainConfig() if preset == "custom" else stage(preset)
    train = dict(recipe.get("train", {}))
    check_no_optim_keys("[train]", train)
    if output is not None:
        train["output_dir"] = output
    optim = dict(recipe.get("optim", {}))
    return base.replace(**train, optim=optim) if optim else base.replace(**train)
