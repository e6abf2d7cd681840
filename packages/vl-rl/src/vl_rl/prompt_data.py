"""The ``[data]`` recipe section of an RL run: your prompts (JSONL or ``datasets``) or synthetic ones, checked.

RL prompts use vl-train's sample format (:mod:`vl_train.data.format`: chat ``messages`` with image and
video items, videos as files or frame lists, several images per prompt) read by vl-train's own readers,
with two fields RL needs: ``answer`` (the reference the verifier reads) and ``task`` (per-task rewards and
mixed-task batches). A final assistant turn, if any, is dropped from the prompt. Keys::

    [data]
    kind = "jsonl"  # "jsonl", "hf" (Hugging Face datasets) or "synthetic"
    path = "data/rl_train.jsonl"  # jsonl: the file; hf: a dataset name or local dataset folder
    heldout_path = "data/rl_eval.jsonl"  # held-out prompts from a second source (hf: heldout_split)
    heldout_size = 200  # at most this many held-out prompts (0: no evaluation)
    policy = "skip"  # bad prompts: "fail" (stop, naming it) or "skip" (count, go on)

Every prompt is checked once before training, with the policy of vl-train's renderer: its structure (a
user turn; :func:`vl_train.data.format.validate_sample`), an ``answer`` when its task's reward is a
verifier, and its media (every image and frame opened). Skipped prompts are counted in a
:class:`vl_train.data.DataStats` (``skipped_invalid``, ``skipped_no_answer``, ``skipped_bad_media``) with
examples naming the sample id and ``file:line``. Synthetic prompts
(:class:`vl_train.data.synthetic.SyntheticDataset`) take ``tasks``, ``size``, ``seed``,
``image_size_range``, ``grid``, ``thinking`` and the held-out split's ``heldout_size`` / ``heldout_seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vl_train.data.format import DataError, DataStats, HFDataset, JsonlDataset, validate_sample
from vl_train.data.messages import sample_messages

from .prompt_sampling import task_of
from .reward_spec import RecipeReward

__all__ = ["DATA_TYPES", "PromptData", "load_prompts"]

DATA_TYPES: dict[str, Any] = {
    "kind": Literal["synthetic", "jsonl", "hf"],
    "path": str,
    "heldout_path": str,
    "split": str,
    "heldout_split": str,
    "heldout_size": int,
    "policy": Literal["fail", "skip"],
    "tasks": list[str],
    "size": int,
    "seed": int,
    "image_size_range": tuple[int, int],
    "grid": int,
    "thinking": float,
    "heldout_seed": int,
}
"""``[data]`` keys and their types."""
_KIND_KEYS = {
    "synthetic": {"tasks", "size", "seed", "image_size_range", "grid", "thinking", "heldout_seed"},
    "jsonl": {"path", "heldout_path"},
    "hf": {"path", "split", "heldout_split"},
}
_COMMON = {"kind", "heldout_size", "policy"}


@dataclass
class PromptData:
    """The prompts of a run.

    Attributes:
        train: Training prompts (the checked ones).
        heldout: Held-out prompts for evaluation (may be empty).
        stats: What was kept (``prompts``, ``heldout_prompts``) and skipped, with examples.
    """

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    stats: DataStats = field(default_factory=DataStats)


def check_data_section(section: Mapping[str, Any]) -> str:
    """Check ``[data]``'s keys and types for its kind; returns the kind.

    Raises:
        ValueError: An unknown key, a value of the wrong type, a key of another kind, a missing ``path``.
    """
    from vl_train.recipe import check_keys

    check_keys("[data]", section, DATA_TYPES)
    kind = str(section.get("kind", "synthetic"))
    foreign = sorted(set(section) - _COMMON - _KIND_KEYS[kind])
    if foreign:
        raise ValueError(
            f"[data] keys {foreign} do not apply to kind = {kind!r}; its keys are {sorted(_COMMON | _KIND_KEYS[kind])}"
        )
    if kind != "synthetic" and "path" not in section:
        raise ValueError(f"[data] kind = {kind!r} needs a path")
    return kind


def _synthetic(section: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from vl_train.data.synthetic import SyntheticDataset

    common: dict[str, Any] = {
        "tasks": section.get("tasks"),
        "thinking": float(section.get("thinking", 0.0)),
        "grid": int(section.get("grid", 0)),
    }
    if "image_size_range" in section:
        common["image_size_range"] = tuple(section["image_size_range"])
    train = SyntheticDataset("train", size=int(section.get("size", 512)), seed=int(section.get("seed", 0)), **common)
    size = int(section.get("heldout_size", 64))
    held = SyntheticDataset("heldout", size=size, seed=int(section.get("heldout_seed", 0)), **common)
    return list(train), list(held)


def _read(section: Mapping[str, Any], kind: str, held: bool) -> Iterable[dict[str, Any]]:
    if kind == "jsonl":
        path = section.get("heldout_path" if held else "path")
        return [] if path is None else JsonlDataset(str(path), validate=False)
    split = section.get("heldout_split" if held else "split", None if held else "train")
    return [] if split is None else HFDataset(str(section["path"]), split=str(split), validate=False)


def _checked(
    samples: Iterable[dict[str, Any]],
    policy: str,
    reward: RecipeReward | None,
    stats: DataStats,
    counted: str,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for sample in samples:
        if limit is not None and len(kept) >= limit:
            break
        try:
            validate_sample(sample, prompt_only=True)
        except DataError as exc:
            _bad(policy, stats, "skipped_invalid", exc)
            continue
        task = task_of(sample)
        if reward is not None and not reward.covers(task):
            raise ValueError(
                f"sample {sample.get('id')!r} ({sample.get('_source') or 'no location'}) has task {task!r}, which no "
                f"reward covers: add [reward.tasks.{task}] or a top-level base reward (tasks with a reward: "
                f"{list(reward.tasks)})"
            )
        if reward is not None and reward.needs_answer(task) and sample.get("answer") is None:
            missing = DataError(
                f"has no 'answer' for its {task!r} verifier",
                sample_id=str(sample.get("id")),
                location=sample.get("_source"),
            )
            _bad(policy, stats, "skipped_no_answer", missing)
            continue
        try:
            sample_messages(sample, prompt_only=True)  # opens every image and frame once
        except DataError as exc:
            _bad(policy, stats, "skipped_bad_media", exc)
            continue
        stats.add(counted)
        kept.append(sample)
    return kept


def _bad(policy: str, stats: DataStats, event: str, exc: DataError) -> None:
    if policy == "fail":
        raise exc
    stats.add(event, str(exc))


def load_prompts(section: Mapping[str, Any], reward: RecipeReward | None = None) -> PromptData:
    """The training and held-out prompts of a ``[data]`` section, each checked (see the module docstring).

    Args:
        section: The ``[data]`` table.
        reward: The run's reward (which tasks it covers, which need ``answer``); None checks neither.

    Raises:
        ValueError: A bad section, a prompt whose task no reward covers, or no training prompt left.
        DataError: With ``policy = "fail"``: the first bad prompt (id, ``file:line`` and the problem named).
        FileNotFoundError: A JSONL file that does not exist.
    """
    kind = check_data_section(section)
    policy = str(section.get("policy", "fail"))
    stats = DataStats()
    train_raw: Iterable[dict[str, Any]]
    held_raw: Iterable[dict[str, Any]]
    if kind == "synthetic":
        train_raw, held_raw = _synthetic(section)
        limit = None
    else:
        train_raw, held_raw = _read(section, kind, False), _read(section, kind, True)
        limit = section.get("heldout_size")
    train = _checked(train_raw, policy, reward, stats, "prompts")
    heldout = _checked(held_raw, policy, reward, stats, "heldout_prompts", None if limit is None else int(limit))
    if not train:
        raise ValueError(f"[data] left no training prompt ({stats.report() or 'the source is empty'})")
    return PromptData(train, heldout, stats)
