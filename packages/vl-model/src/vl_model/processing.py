"""``VLProcessor``: tokenizer + torchvision-free image/video processors with Qwen3-VL's token layout.

Implements the multimodal prompt layout of Qwen3-VL (Qwen3-VL technical report, arXiv
2511.21631, section 2 "video timestamp"; REFERENCE.md sections 1 and 2), token for token as
transformers' ``Qwen3VLProcessor`` lays it out:

- every ``<|image_pad|>`` of the text becomes ``t * h * w / m**2`` image pads (one per merged token);
- every ``<|video_pad|>`` becomes, for each temporal patch ``k``, the timestamp text ``<t_k seconds>``
  followed by ``<|vision_start|>``, ``h * w / m**2`` video pads and ``<|vision_end|>`` (inside the
  template's own ``<|vision_start|> ... <|vision_end|>`` pair, as transformers does);
- ``mm_token_type_ids`` marks text 0, image pads 1, video pads 2 (what ``get_rope_index`` reads).

Pixels come from :class:`vl_vision.processing.ImageProcessor` / ``VideoProcessor``; the chat template
is :data:`vl_model.chat_template.CHAT_TEMPLATE`. ``save_pretrained`` writes the official Qwen3-VL
files (``preprocessor_config.json``, ``video_preprocessor_config.json``, the tokenizer's files and
``chat_template.jinja``), which plain transformers reads; ``from_pretrained`` reads them, an official
Hub folder, or a folder written by an earlier version (``processor_config.json``).

Notation: grid ``(t, h, w)`` in patches; ``m`` merge size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from vl_vision.processing import ImageProcessor, VideoProcessor

from ._processor_files import IMAGE_FILE, VIDEO_FILE, media_kwargs, official_files
from ._prompts import PromptEncoding, has_generation_markers, split_media
from .chat_template import CHAT_TEMPLATE

__all__ = ["VLProcessor", "has_generation_markers", "split_media"]

PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# init arguments saved in processor_config.json (num_threads is a property of the machine, not saved)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _is_frame(item: object) -> bool:
    """An image that can only be a frame: a PIL image, an ``[H, W(, C)]`` array or encoded image bytes."""
    if isinstance(item, bytes | bytearray):
        return True
    return isinstance(item, PIL.Image.Image) or (isinstance(item, np.ndarray | torch.Tensor) and item.ndim in (2, 3))


def _flatten_videos(videos: Any, depth: int = 0) -> list[Any]:
    """A flat list of videos from one video, a list of videos, or per-sample lists of videos.

    transformers' nesting: ``videos`` is a list of videos or per-sample lists of videos, and a video is a
    file path, a 4-D array, or a list of frames. A list of frames (PIL images, arrays, encoded bytes) is one
    video at any depth; a list at the third level (inside a per-sample list) is always one video, so its
    frames may also be image file paths (``[[["f0.png", "f1.png"]]]``: one sample, one video of two frames),
    while a flat list of paths is a list of video files.
    """
    if isinstance(videos, str | os.PathLike | np.ndarray | torch.Tensor):
        return [videos]
    if isinstance(videos, bytes | bytearray):
        raise TypeError("a video cannot be given as encoded bytes: give its frames (a list of images) or a file path")
    if isinstance(videos, Sequence):
        if len(videos) > 0 and (depth >= 2 or all(_is_frame(v) for v in videos)):
            return [list(videos)]  # a list of frames is one video
        return [v for item in videos for v in _flatten_videos(item, depth + 1)]
    raise TypeError(f"unsupported videos type {type(videos).__name__}")


def _flatten_images(images: Any) -> list[Any]:
    """A flat list of images from one image, a list, or per-sample lists (transformers' nesting)."""
    if isinstance(images, list | tuple):
        return [im for item in images for im in _flatten_images(item)]
    return [images]


def _video_fps(video_fps: Any, video_metadata: Any, count: int) -> Any:
    """Per-video source frame rates from ``video_fps`` or transformers-style ``video_metadata``."""
    if video_metadata is None:
        return video_fps
    metadata = video_metadata if isinstance(video_metadata, list | tuple) else [video_metadata]
    if len(metadata) != count:
        raise ValueError(f"got {len(metadata)} video_metadata entries for {count} videos")
    return [m.get("fps") if isinstance(m, dict) else getattr(m, "fps", None) for m in metadata]


class VLProcessor(ProcessorMixin, PromptEncoding):
    """Tokenizer, image processor and video processor of a Qwen3-VL-class model behind one call.

    Args:
        image_processor: Image preprocessing (default: ``ImageProcessor()`` with Qwen3-VL settings).
        video_processor: Video preprocessing (default: ``VideoProcessor()``).
        tokenizer: A tokenizer that knows ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``
            and ``<|vision_end|>``.
        chat_template: Jinja chat template (default: :data:`~vl_model.chat_template.CHAT_TEMPLATE`).

    Raises:
        ValueError: No tokenizer, or the tokenizer lacks one of the vision tokens.
    """

    def __init__(
        self,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin.__init__ insists on transformers' own processor classes, so set the parts here
        if tokenizer is None:
            raise ValueError("VLProcessor needs a tokenizer")
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.video_processor = video_processor if video_processor is not None else VideoProcessor()
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        ids = {}
        for token in (self.image_token, self.video_token, self.vision_start_token, self.vision_end_token):
            value = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(value, int) or value == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token} token, which VLProcessor needs")
            ids[token] = value
        self.image_token_id = ids[self.image_token]
        self.video_token_id = ids[self.video_token]
        self.vision_start_token_id = ids[self.vision_start_token]
        self.vision_end_token_id = ids[self.vision_end_token]

    @property
    def model_input_names(self) -> list[str]:
        """Keys a ``VLForConditionalGeneration`` forward accepts from this processor's output."""
        return [
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        ]

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        *,
        video_fps: float | Sequence[float | None] | None = None,
        video_metadata: Any = None,
        fps: float | None = None,
        num_frames: int | None = None,
        do_sample_frames: bool = True,
        return_tensors: str | None = None,
        return_mm_token_type_ids: bool = True,
        return_text_replacement_offsets: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images and videos and tokenize the text with expanded placeholders.

        Args:
            images: One image, a list, or per-sample lists of images (any input ``ImageProcessor`` takes).
            text: One prompt or a batch; each ``<|image_pad|>`` / ``<|video_pad|>`` stands for one input.
            videos: One video, a list, or per-sample lists of videos (arrays, frame lists, paths).
            audio: Not supported; must be None.
            video_fps: Source frame rate(s) of frame arrays (files know their own).
            video_metadata: transformers-style metadata (objects or dicts with ``fps``), instead of ``video_fps``.
            fps: Sampling rate for this call (default: the video processor's).
            num_frames: Sample exactly this many frames per video instead.
            do_sample_frames: False keeps every given frame.
            return_tensors: ``"pt"``, ``"np"`` or None (lists for the text keys).
            return_mm_token_type_ids: Also return ``mm_token_type_ids``.
            return_text_replacement_offsets: Also return where placeholders were expanded (used by
                ``apply_chat_template(..., return_assistant_tokens_mask=True)``).
            **kwargs: Tokenizer options (``padding``, ``padding_side``, ``truncation``, ``max_length``,
                ``add_special_tokens``...); ``text_kwargs`` / ``videos_kwargs`` dicts are merged in.

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
            ``pixel_values`` + ``image_grid_thw`` (if images), ``pixel_values_videos`` +
            ``video_grid_thw`` (if videos).

        Raises:
            ValueError: Placeholder counts that differ from the number of images or videos, or
                truncation that cut into an image or video.
        """
        if audio is not None:
            raise ValueError("VLProcessor does not take audio")
        kwargs.pop("images_kwargs", None)
        kwargs.update(kwargs.pop("text_kwargs", None) or {})
        video_options: dict[str, Any] = dict(fps=fps, num_frames=num_frames, do_sample_frames=do_sample_frames)
        video_options.update(video_fps=video_fps, video_metadata=video_metadata)
        video_options.update(kwargs.pop("videos_kwargs", None) or {})
        kwargs.pop("return_metadata", None)
        if images is None and videos is None and text is None:
            raise ValueError("VLProcessor needs text, images or videos")
        if isinstance(text, list | tuple) and not text:
            raise ValueError("VLProcessor got text=[]: an empty batch; give at least one text (or text=None)")

        data: dict[str, Any] = {}
        image_grids: list[list[int]] = []
        if images is not None:
            flat = _flatten_images(images)
            out = self.image_processor(flat)
            data.update(out)
            image_grids = out["image_grid_thw"].tolist()
        video_grids: list[list[int]] = []
        stamps: list[list[str]] = []
        if videos is not None:
            flat_videos = _flatten_videos(videos)
            rates = _video_fps(video_options.pop("video_fps"), video_options.pop("video_metadata"), len(flat_videos))
            out_v = self.video_processor(flat_videos, rates, **video_options)
            data["pixel_values_videos"] = out_v["pixel_values_videos"]
            data["video_grid_thw"] = out_v["video_grid_thw"]
            video_grids, stamps = out_v["video_grid_thw"].tolist(), out_v["timestamps"]

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            expanded, offsets = self._expand(texts, image_grids, video_grids, stamps)
            encoded = self.tokenizer(expanded, **kwargs)
            self._check_truncation(expanded, encoded["input_ids"])
            data.update(encoded)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = [self._token_types(row) for row in encoded["input_ids"]]
            if return_text_replacement_offsets:
                data["text_replacement_offsets"] = offsets
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def _expand(
        self, texts: list[str], image_grids: list[list[int]], video_grids: list[list[int]], stamps: list[list[str]]
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Replace each placeholder by its expanded token run; also report the replaced spans."""
        n_image_text = sum(t.count(self.image_token) for t in texts)
        n_video_text = sum(t.count(self.video_token) for t in texts)
        if n_image_text != len(image_grids):
            raise ValueError(
                f"the text has {n_image_text} {self.image_token} placeholders but {len(image_grids)} images were "
                "given: write one placeholder per image"
            )
        if n_video_text != len(video_grids):
            raise ValueError(
                f"the text has {n_video_text} {self.video_token} placeholders but {len(video_grids)} videos were "
                "given: write one placeholder per video"
            )
        merge_image = self.image_processor.merge_size**2
        merge_video = self.video_processor.merge_size**2
        image_runs = iter([self.image_token * (t * h * w // merge_image) for t, h, w in image_grids])
        video_runs = iter(
            [
                "".join(
                    f"{stamp}{self.vision_start_token}{self.video_token * (h * w // merge_video)}{self.vision_end_token}"
                    for stamp in stamps[i][:t]
                )
                for i, (t, h, w) in enumerate(video_grids)
            ]
        )
        pattern = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")
        out, all_offsets = [], []
        for sample in texts:
            pieces, offsets, last, shift = [], [], 0, 0
            for match in pattern.finditer(sample):
                kind = "image" if match.group() == self.image_token else "video"
                runs: Iterator[str] = image_runs if kind == "image" else video_runs
                replacement = next(runs)
                start, end = match.span()
                pieces += [sample[last:start], replacement]
                new_span = (start + shift, start + shift + len(replacement))
                offsets.append(
                    dict(type=kind, span=(start, end), new_span=new_span, text=match.group(), replacement=replacement)
                )
                shift += len(replacement) - (end - start)
                last = end
            pieces.append(sample[last:])
            out.append("".join(pieces))
            all_offsets.append(offsets)
        return out, all_offsets

    def _check_truncation(self, texts: list[str], input_ids: Any) -> None:
        for i, (sample, row) in enumerate(zip(texts, input_ids)):
            ids = list(row)
            for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
                want, got = sample.count(token), ids.count(token_id)
                if want != got:
                    raise ValueError(
                        f"text {i}: {want} {token} tokens after expansion but {got} after tokenization; "
                        "truncation must not cut into an image or a video (raise max_length)"
                    )

    def _token_types(self, row: Any) -> list[int]:
        ids = np.asarray(list(row))
        types = np.zeros(ids.shape, dtype=np.int64)
        types[ids == self.image_token_id] = 1
        types[ids == self.video_token_id] = 2
        return [int(v) for v in types]

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str]:
        """Decode generated token ids ``[B, L]`` (or ``[L]``) to text, dropping special tokens."""
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # ------------------------------------------------------------------ save / load

    def to_dict(self) -> dict[str, Any]:
        """The two preprocessor files' contents (see :mod:`vl_model._processor_files`)."""
        return official_files(self.image_processor, self.video_processor)

    def media_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The arguments that rebuild the image and the video processor (``ImageProcessor(**image)``, ...)."""
        files = self.to_dict()
        return media_kwargs(files[IMAGE_FILE], video=False), media_kwargs(files[VIDEO_FILE], video=True)

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any
    ) -> list[str]:
        """Write the tokenizer, the preprocessor files and ``chat_template.jinja`` in the official layout.

        Plain transformers reads them (``Qwen3VLProcessor`` and its parts); ``from_pretrained`` reads them back
        with every setting.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        written = []
        for name, content in self.to_dict().items():
            (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            written.append(str(folder / name))
        stale = folder / PROCESSOR_CONFIG  # an earlier version's file would shadow the new ones
        if stale.is_file() and "image_processor" in json.loads(stale.read_text(encoding="utf-8")):
            stale.unlink()
        template_file = folder / CHAT_TEMPLATE_FILE
        if isinstance(self.chat_template, str):
            template_file.write_text(self.chat_template, encoding="utf-8")
            written.append(str(template_file))
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", folder.name)
            self.push_to_hub(repo_id, **kwargs)
        return written

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> VLProcessor:
        """Load from a folder or Hub repo written by :meth:`save_pretrained` or an official Qwen3-VL one.

        Args:
            pretrained_model_name_or_path: Local folder or Hub repo id.
            **kwargs: Hub options (``cache_dir``, ``local_files_only``, ``token``, ``revision``,
                ``subfolder``); ``trust_remote_code`` is ignored (no remote code is ever run);
                ``chat_template`` overrides the saved template.

        Raises:
            OSError: Neither our ``processor_config.json`` nor a Qwen3-VL ``preprocessor_config.json`` exists.
        """
        kwargs.pop("trust_remote_code", None)
        chat_template = kwargs.pop("chat_template", None)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub)

        def read(name: str) -> str | None:
            path = Path(pretrained_model_name_or_path) / hub.get("subfolder", "") / name
            if path.is_file():
                return path.read_text(encoding="utf-8")
            if Path(pretrained_model_name_or_path).is_dir():
                return None
            from huggingface_hub import hf_hub_download

            try:  # a missing optional file on the Hub is not an error here
                found = hf_hub_download(str(pretrained_model_name_or_path), name, **hub)
            except OSError:
                return None
            return Path(found).read_text(encoding="utf-8")

        ours, image_hf, video_hf = read(PROCESSOR_CONFIG), read(IMAGE_FILE), None
        config = json.loads(ours) if ours else {}
        if "image_processor" in config:  # written by an earlier version
            image = ImageProcessor(**config["image_processor"])
            video = VideoProcessor(**config.get("video_processor", {}))
        elif image_hf is not None:
            video_hf = read(VIDEO_FILE)
            image = ImageProcessor(**media_kwargs(json.loads(image_hf), video=False))
            video = VideoProcessor(**media_kwargs(json.loads(video_hf or image_hf), video=video_hf is not None))
        else:
            raise OSError(
                f"{pretrained_model_name_or_path} has neither {PROCESSOR_CONFIG} nor preprocessor_config.json"
            )
        template = chat_template or read(CHAT_TEMPLATE_FILE) or getattr(tokenizer, "chat_template", None)
        return cls(image_processor=image, video_processor=video, tokenizer=tokenizer, chat_template=template)
