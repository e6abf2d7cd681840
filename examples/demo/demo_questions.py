"""Save the demo model in Hugging Face format, reload it through ``transformers`` and ask it questions.

The reload goes through ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``
after ``import vl_model`` (which registers the suite's classes with the Auto factories), so it checks
that the saved folder is a self-contained Hugging Face model. The questions are about freshly drawn
images (count, colour, spatial) and one short video, from a seed the training data never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from demo_eval import generate_answers
from demo_report import QA

__all__ = ["ask_examples", "example_samples", "reload_model", "save_model"]

_EXAMPLE_SEED = 2026  # never a training seed: the images are new to the model


def save_model(model: Any, processor: Any, folder: str | Path) -> Path:
    """``save_pretrained`` the model and processor into ``folder`` (created)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def reload_model(folder: str | Path) -> tuple[Any, Any]:
    """``(model, processor)`` read back by the ``transformers`` Auto classes.

    Raises:
        FileNotFoundError: ``folder`` holds no ``config.json``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vl_model  # noqa: F401  (registers the vl_model classes with the Auto factories)

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {folder}: expected {folder}/config.json")
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    processor = AutoProcessor.from_pretrained(str(folder))
    model.eval()
    return model, processor


def example_samples(
    image_tasks: Sequence[str] = ("count", "colour", "spatial"),
    video_task: str = "video_move",
    *,
    image_size_range: tuple[int, int] = (48, 80),
    grid: int = 0,
) -> list[dict[str, Any]]:
    """One fresh held-out sample per image task, then one video sample."""
    from vl_train.data.synthetic import SyntheticDataset

    out = []
    for i, task in enumerate([*image_tasks, video_task]):
        ds = SyntheticDataset(
            "heldout",
            size=1,
            seed=_EXAMPLE_SEED + i,
            tasks=[task],
            image_size_range=image_size_range,
            video_frames=(2, 4),
            thinking=0.0,
            grid=grid,
        )
        out.append(ds[0])
    return out


def _question(sample: dict[str, Any]) -> tuple[str, str, Any]:
    content = sample["messages"][0]["content"]
    text = " ".join(item["text"] for item in content if item["type"] == "text")
    media = next(item for item in content if item["type"] in ("image", "video"))
    image = media["image"] if media["type"] == "image" else media["video"][0]
    return media["type"], text, image


def ask_examples(
    model: Any, processor: Any, samples: Sequence[dict[str, Any]], media_dir: str | Path, *, max_new_tokens: int = 24
) -> list[QA]:
    """Answer each sample greedily, save its image (or first video frame) as PNG, and score the answer."""
    from vl_train.data.synthetic import verify

    folder = Path(media_dir)
    folder.mkdir(parents=True, exist_ok=True)
    answers = generate_answers(model, processor, samples, max_new_tokens=max_new_tokens, thinking=False)
    out = []
    for i, (sample, answer) in enumerate(zip(samples, answers)):
        kind, question, image = _question(sample)
        name = f"example_{i}_{sample['task']}.png"
        image.resize((image.width * 2, image.height * 2)).save(folder / name)
        expected = sample["messages"][-1]["content"][0]["text"]
        out.append(QA(kind, question, answer.strip(), expected, verify(sample, answer), f"{folder.name}/{name}"))
    return out
