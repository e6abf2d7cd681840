"""Builders from recipe sections: the model and its processor, the data mixture and the batch stream.

Used by the ``vl-train`` and ``vl-rl`` command lines, the demo and any script that wants what a recipe
describes. ``[model]`` (:data:`vl_train.recipe.MODEL_KEYS`):

- ``init_from``: a model folder (``config.json`` + safetensors: ours, an official ``qwen3_vl`` /
  ``qwen3_vl_moe`` checkpoint, or a composed ``vl_composed`` one) or a previous run's output folder
  with ``model/`` in it. Its own processor (tokenizer, chat template, image and video budgets from its
  preprocessor files) is loaded with it; ``tokenizer`` replaces only the tokenizer;
- else a fresh ``VLForConditionalGeneration`` from ``[model.text]`` / ``[model.vision]``
  (``VLTextConfig`` / ``VLVisionConfig`` fields; the vocabulary size and special-token ids come from
  the tokenizer, which ``tokenizer`` names: a folder, or ``"demo"`` for :mod:`vl_train.testing`);
- ``min_pixels`` / ``max_pixels`` (images), ``fps`` / ``max_frames`` (videos) override the budgets;
  ``seed`` seeds a fresh model's initialisation.

The processor's patch sizes and the tokenizer's special-token ids are checked against the model's
config; a mismatch is an error naming both values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import TrainConfig
from .recipe import SOURCE_KEYS

if TYPE_CHECKING:
    from .data.mixture import MixtureSampler
    from .data.stream import PackedStream

__all__ = [
    "OFFICIAL_LAYOUTS",
    "build_data",
    "build_mixture",
    "build_model",
    "build_processor",
    "check_processor",
    "checkpoint_layout",
    "load_model",
    "save_final_model",
    "save_model",
    "weights_folder",
]

TOKEN_NAMES = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_IMAGE_BUDGETS = ("min_pixels", "max_pixels")
_VIDEO_BUDGETS = ("min_pixels", "max_pixels", "fps", "max_frames")


def weights_folder(path: str | Path) -> Path:
    """The folder holding ``config.json`` + weights: ``path`` itself or a vl-train run's ``path/model``."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no model in {folder}: expected {folder}/config.json or {folder}/model/config.json "
        "(the final model a vl-train run writes); run the previous stage first or pass --init-from"
    )


def load_model(path: str | Path) -> Any:
    """The model in ``path`` (see :func:`weights_folder`): ours, an official Qwen3-VL or a composed one.

    Raises:
        FileNotFoundError: No ``config.json`` there.
        ValueError: A ``model_type`` none of our classes loads.
    """
    from vl_model import ComposedVLForConditionalGeneration, VLForConditionalGeneration

    folder = weights_folder(path)
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == "vl_composed":
        return ComposedVLForConditionalGeneration.from_pretrained(str(folder))
    if model_type in ("vl", "qwen3_vl", "qwen3_vl_moe"):
        return VLForConditionalGeneration.from_pretrained(str(folder))
    raise ValueError(
        f"{folder}/config.json has model_type {model_type!r}; init_from takes 'qwen3_vl', 'qwen3_vl_moe', "
        "'vl' (ours) and 'vl_composed' checkpoints"
    )


def _vision_sizes(model: Any) -> tuple[int, int, int]:
    """``(patch, spatial merge, temporal patch)`` of the model's tower."""
    tower = model.vision_tower().config
    return int(tower.patch_size), int(tower.spatial_merge_size), int(tower.temporal_patch_size)


def _with_budgets(processor: Any, section: Mapping[str, Any]) -> Any:
    """The processor with ``[model]``'s image / video budgets applied (new media processors, same tokenizer)."""
    from vl_vision.processing import ImageProcessor, VideoProcessor

    image = {k: section[k] for k in _IMAGE_BUDGETS if k in section}
    video = {k: section[k] for k in _VIDEO_BUDGETS if k in section}
    if not image and not video:
        return processor
    image_settings, video_settings = processor.media_settings()
    processor.image_processor = ImageProcessor(**{**image_settings, **image})
    processor.video_processor = VideoProcessor(**{**video_settings, **video})
    return processor


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def build_processor(section: Mapping[str, Any], sizes: tuple[int, int, int], folder: Path | None = None) -> Any:
    """The processor of ``[model]`` (see the module docstring).

    Args:
        section: The ``[model]`` section.
        sizes: ``(patch, spatial merge, temporal patch)`` of the model's tower, for a processor built here.
        folder: The checkpoint folder the model came from (``None``: a fresh model).

    Raises:
        ValueError: No tokenizer anywhere (a fresh model without ``tokenizer``, or a checkpoint folder
            without tokenizer files and no ``tokenizer`` key).
    """
    from vl_model import VLProcessor

    patch, merge, temporal = sizes
    tokenizer = section.get("tokenizer")
    if tokenizer == "demo":
        from .testing import make_demo_processor

        budgets = {k: section[k] for k in ("min_pixels", "max_pixels", "fps", "max_frames") if k in section}
        return make_demo_processor(patch_size=patch, merge_size=merge, temporal_patch_size=temporal, **budgets)
    if folder is not None and _has_tokenizer(folder):
        processor = VLProcessor.from_pretrained(str(folder))
        if tokenizer is not None:
            from transformers import AutoTokenizer

            processor = VLProcessor(
                processor.image_processor,
                processor.video_processor,
                AutoTokenizer.from_pretrained(str(tokenizer)),
                processor.chat_template,  # type: ignore[arg-type]
            )
        return _with_budgets(processor, section)
    if tokenizer is None:
        where = f"{folder} has no tokenizer files" if folder is not None else "a fresh model has no tokenizer"
        raise ValueError(f'{where}: set [model] tokenizer = a tokenizer folder (or "demo" for tests and examples)')
    from transformers import AutoTokenizer

    from vl_vision.processing import ImageProcessor, VideoProcessor

    image = ImageProcessor(patch, temporal, merge)
    video = VideoProcessor(patch, temporal, merge)
    processor = VLProcessor(image, video, AutoTokenizer.from_pretrained(str(tokenizer)))
    return _with_budgets(processor, section)


def check_processor(model: Any, processor: Any) -> None:
    """Check that ``processor`` fits ``model``: patch sizes, special-token ids and vocabulary size.

    Raises:
        ValueError: The first mismatch, naming the model's and the processor's values.
    """
    patch, merge, temporal = _vision_sizes(model)
    for kind, proc in (("image", processor.image_processor), ("video", processor.video_processor)):
        cuts = (int(proc.patch_size), int(proc.merge_size), int(proc.temporal_patch_size))
        if cuts != (patch, merge, temporal):
            raise ValueError(
                f"the {kind} processor cuts (patch, merge, temporal) = {cuts} but the model's vision tower "
                f"expects {(patch, merge, temporal)}"
            )
    config = model.config
    for name, token in TOKEN_NAMES.items():
        want = getattr(config, name, None)
        have = getattr(processor, name, None)
        if want is not None and have is not None and int(want) != int(have):
            raise ValueError(
                f"the tokenizer's {token} is id {have} but the model config's {name} is {want}: the tokenizer "
                "does not belong to this model (give [model] tokenizer = the model's own tokenizer)"
            )
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if len(processor.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(processor.tokenizer)} tokens but the model's embedding holds only {vocab}: "
            "token ids past the vocabulary would crash the embedding lookup"
        )


def _fresh_model(section: Mapping[str, Any]) -> tuple[Any, Any]:
    from vl_model import VLConfig, VLForConditionalGeneration
    from vl_vision import VisionConfig

    text = dict(section.get("text", {}))
    vision = dict(section.get("vision", {}))
    defaults = VisionConfig()
    sizes = tuple(
        int(vision.get(k, getattr(defaults, k))) for k in ("patch_size", "spatial_merge_size", "temporal_patch_size")
    )
    processor = build_processor(section, sizes)  # type: ignore[arg-type]
    tok = processor.tokenizer
    text.setdefault("vocab_size", -(-len(tok) // 64) * 64)
    text.setdefault("eos_token_id", tok.eos_token_id)
    text.setdefault("pad_token_id", tok.pad_token_id)
    if "hidden_size" in text:
        vision.setdefault("out_hidden_size", text["hidden_size"])
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in TOKEN_NAMES.items()}
    torch.manual_seed(int(section.get("seed", 0)))
    return VLForConditionalGeneration(VLConfig(text_config=text, vision_config=vision, **ids)), processor


def build_model(section: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(model, processor)`` from a ``[model]`` section (see the module docstring), checked against each other.

    Raises:
        FileNotFoundError: ``init_from`` holds no model.
        ValueError: No tokenizer, an unknown checkpoint type, or a processor that does not fit the model.
    """
    source = section.get("init_from")
    if source:
        folder = weights_folder(str(source))
        model = load_model(folder)
        processor = build_processor(section, _vision_sizes(model), folder)
    else:
        model, processor = _fresh_model(section)
    check_processor(model, processor)
    return model, processor


def _source(spec: Mapping[str, Any], default_seed: int, policy: str = "fail", stats: Any = None) -> Any:
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
        return JsonlDataset(spec["path"], policy=policy, stats=stats)  # type: ignore[arg-type]
    raise ValueError(f"unknown data source kind {kind!r}; kinds are ['synthetic', 'jsonl']")


def build_mixture(data_section: Mapping[str, Any], config: TrainConfig, stats: Any = None) -> MixtureSampler:
    """The ``[data]`` section's samples: one source or a mixture of ``[data.sources.NAME]`` by ratio (endless).

    Malformed JSONL lines follow ``[data] policy`` (``"skip"``: counted in ``stats`` as ``skipped_bad_line`` /
    ``skipped_invalid``).
    """
    from .data.mixture import MixtureSampler

    seed = int(data_section.get("seed", config.seed))
    policy = str(data_section.get("policy", "fail"))
    specs = dict(data_section.get("sources", {})) or {
        "data": {k: v for k, v in data_section.items() if k in SOURCE_KEYS}
    }
    sources = {name: _source(spec, seed, policy, stats) for name, spec in specs.items()}
    ratios = {name: float(spec.get("ratio", 1.0)) for name, spec in specs.items()}
    return MixtureSampler(sources, ratios, seed=seed, shuffle_buffer=int(data_section.get("shuffle_buffer", 1000)))


def build_data(data_section: Mapping[str, Any], processor: Any, config: TrainConfig) -> PackedStream:
    """An endless, checkpointable stream of training batches: mixture -> chat rendering -> packing (or padding).

    Its ``state_dict()`` goes into the trainer's checkpoints, so a resumed run continues the data exactly.
    """
    from .data.format import DataStats
    from .data.render import SampleRenderer
    from .data.stream import PackedStream

    stats = DataStats()  # one count for the reader's bad lines and the renderer's bad samples
    mixture = build_mixture(data_section, config, stats)
    thinking = {"auto": None, "on": True, "off": False}[config.thinking]
    renderer = SampleRenderer(
        processor,
        max_length=config.max_length,
        overlong=data_section.get("overlong", "drop"),
        policy=data_section.get("policy", "fail"),
        thinking=thinking,
        stats=stats,
    )
    return PackedStream(
        mixture,
        renderer,
        max_length=config.max_length,
        pad_token_id=int(processor.tokenizer.pad_token_id),
        rows_per_batch=config.micro_batch_size,
        packing=config.packing,
    )


OFFICIAL_LAYOUTS = ("qwen3_vl", "qwen3_vl_moe")
"""Checkpoint layouts that runs starting from them are saved back in (plain transformers and vLLM load them)."""


def checkpoint_layout(section: Mapping[str, Any]) -> str:
    """The ``model_type`` of ``[model] init_from`` (``qwen3_vl``, ``qwen3_vl_moe``, ``vl``, ``vl_composed``); ``vl``
    for a fresh model."""
    source = section.get("init_from")
    if not source:
        return "vl"
    folder = weights_folder(str(source))
    return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "vl"))


def save_model(model: Any, processor: Any, folder: str | Path, layout: str = "vl") -> Path:
    """Save ``model`` and its ``processor`` into ``folder`` (the next stage's ``init_from``); returns the folder.

    Args:
        model: The trained model.
        processor: Its processor (saved in the official Qwen3-VL files, which plain transformers reads).
        folder: Where to write.
        layout: ``qwen3_vl`` / ``qwen3_vl_moe`` write the official checkpoint layout (``export_qwen3_vl``), so
            a run that started from an official checkpoint ends in one; anything else ``save_pretrained``.
    """
    out = Path(folder)
    if layout in OFFICIAL_LAYOUTS:
        from vl_model import export_qwen3_vl

        export_qwen3_vl(model, out)
    else:
        model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def save_final_model(model: Any, processor: Any, model_section: Mapping[str, Any], output_dir: str | Path) -> Path:
    """Write a finished run's ``OUTPUT/model``: the trained model with its processor, in the layout it started from.

    Every rank calls it. A model sharded over several ranks has no whole weights on any of them: rank 0
    rebuilds the architecture from ``model_section`` on the CPU and reads the run's newest checkpoint into it
    (the trainer writes one at the end), instead of gathering the full state on every rank.

    Args:
        model: The trained model.
        processor: Its processor.
        model_section: The recipe's ``[model]`` section (the layout, and the architecture to rebuild).
        output_dir: The run's output folder.
    """
    from .parallel import barrier, is_main_process, world_size

    out = Path(output_dir) / "model"
    layout = checkpoint_layout(model_section)
    if world_size() == 1:
        return save_model(model, processor, out, layout)
    barrier()  # the final checkpoint is complete on every rank
    if is_main_process():
        from .dcp_checkpoint import export_pretrained

        whole, _ = build_model(model_section)
        export_pretrained(output_dir, whole, out, official=layout in OFFICIAL_LAYOUTS)
        processor.save_pretrained(str(out))
    barrier()
    return out
