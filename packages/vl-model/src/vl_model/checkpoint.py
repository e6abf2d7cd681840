"""Checkpoint interop: load official ``qwen3_vl`` / ``qwen3_vl_moe`` checkpoints, export them back.

One adapter per format (the torchtitan ``state_dict_adapter`` idea): our in-memory keys equal
transformers' Qwen3-VL keys, so the only conversion is the MoE expert layout. Hub files of
Qwen3-VL-MoE store ``experts.gate_up_proj`` as ``[E, H, 2I]`` and ``experts.down_proj`` as
``[E, I, H]``; in memory (transformers 5.x and ``vl_moe``) they are ``[E, 2I, H]`` / ``[E, H, I]``.
Like transformers' ``Transpose(1, 2, check_dims=True)`` conversion, a tensor whose shape already
matches the model is kept and a transposed one is transposed, so both layouts load.

Loading follows transformers' ``from_pretrained`` semantics: both formats (official checkpoints
after the expert conversion, as an in-memory ``state_dict``) go through
``PreTrainedModel.from_pretrained``, so weights the checkpoint lacks are initialised and named in
transformers' load report (a base-model checkpoint loads into the head class), unused ones are
reported, and a shape mismatch is an error. ``from_pretrained(None, config=..., state_dict=...)``
works for either key layout.

Safe by default: only safetensors are read; a pickled ``pytorch_model.bin`` is refused unless
``allow_pickle=True``, and even then it is read with ``torch.load(weights_only=True)``. A malformed
index or a truncated safetensors shard is an error naming the file, found before any tensor is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import cached_file

from .configuration import VLConfig

if TYPE_CHECKING:
    from .modeling import VLForConditionalGeneration

__all__ = ["check_weight_files", "export_qwen3_vl", "load_pretrained", "read_state_dict", "to_model_layout"]

_OFFICIAL = ("qwen3_vl", "qwen3_vl_moe")
_EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_HUB_KEYS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in _HUB_KEYS if k in kwargs and kwargs[k] is not None}


def _resolve_dir(name_or_path: str | os.PathLike[str], hub: dict[str, Any]) -> Path:
    """A local folder with the checkpoint files (from the path itself or the Hugging Face cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / hub["subfolder"] if hub.get("subfolder") else path
    local = hub.get("local_files_only") or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    folder = snapshot_download(
        str(name_or_path),
        revision=hub.get("revision"),
        cache_dir=hub.get("cache_dir"),
        token=hub.get("token"),
        local_files_only=bool(local),
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"],
    )
    return Path(folder) / hub["subfolder"] if hub.get("subfolder") else Path(folder)


def _index_files(index: Path) -> list[str]:
    """The shard names of an index file, or an error naming the file and what is wrong with it."""
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint index {index} is not valid JSON ({err})") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"checkpoint index {index} has no 'weight_map' (a non-empty mapping of tensor names to shard files); "
            f"got {str(data)[:80]}"
        )
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"checkpoint index {index}: weight_map values must be shard file names, got {bad[:3]}")
    return sorted(set(weight_map.values()))


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            paths = [folder / f for f in _index_files(index)]
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"checkpoint index {index} names shard(s) {missing[:5]} that are not in {folder}"
                )
            if index_name.endswith(".bin.index.json"):
                _check_pickle(paths, allow_pickle)
            return paths
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickled = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if pickled:
        _check_pickle(pickled, allow_pickle)
        return pickled
    raise FileNotFoundError(f"no model weights (*.safetensors) found in {folder}")


def _check_pickle(paths: Iterable[Path], allow_pickle: bool) -> None:
    if not allow_pickle:
        names = ", ".join(p.name for p in paths)
        raise ValueError(
            f"refusing to load pickled checkpoint file(s) {names}: unpickling can run arbitrary code. "
            f"Convert them to safetensors, or pass allow_pickle=True to read them with torch.load(weights_only=True)"
        )


def check_weight_files(paths: Iterable[Path]) -> None:
    """Open every safetensors file's header: a truncated or corrupt shard is an error naming the file.

    Reads only the headers (safetensors checks that the data they describe is all there), so it costs
    nothing next to the load itself.
    """
    for path in paths:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own error type, not a subclass of OSError
            size = path.stat().st_size if path.is_file() else 0
            raise ValueError(
                f"checkpoint shard {path} ({size} bytes) cannot be read: {err}. The file is probably truncated "
                f"(an interrupted download or copy); fetch it again"
            ) from err


def read_state_dict(folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded with an index), on CPU."""
    paths = _weight_files(Path(folder), allow_pickle)
    check_weight_files(paths)
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(str(path), map_location="cpu", weights_only=True))
    return state


def _expert_shapes(config: VLConfig) -> dict[str, tuple[int, int, int]]:
    text = config.text_config
    e, i, h = int(text.num_experts), int(text.moe_intermediate_size), int(text.hidden_size)
    return {"mlp.experts.gate_up_proj": (e, 2 * i, h), "mlp.experts.down_proj": (e, h, i)}


def to_model_layout(
    state: dict[str, torch.Tensor], model_or_config: torch.nn.Module | VLConfig
) -> dict[str, torch.Tensor]:
    """Transpose Hub-layout MoE expert tensors to the in-memory shapes; leave every other tensor as is.

    Args:
        state: Tensors by key (any prefix: ``model.language_model.layers...`` or a base model's).
        model_or_config: The model, or its ``VLConfig`` (the shapes follow from it).
    """
    config = model_or_config if isinstance(model_or_config, VLConfig) else model_or_config.config
    if not isinstance(config, VLConfig) or config.text_config.num_experts <= 0:
        return dict(state)
    shapes = _expert_shapes(config)
    out = dict(state)
    for key, value in state.items():
        suffix = next((s for s in _EXPERT_SUFFIXES if key.endswith(s)), None)
        if suffix is not None and value.dim() == 3:
            want = torch.Size(shapes[suffix])
            if value.shape != want and value.transpose(1, 2).shape == want:
                out[key] = value.transpose(1, 2).contiguous()
    return out


def _from_state_dict(
    cls: type[VLForConditionalGeneration], config: VLConfig, state: dict[str, torch.Tensor], kwargs: dict[str, Any]
) -> Any:
    """transformers' ``from_pretrained(None, config=..., state_dict=...)`` (missing keys initialised and reported)."""
    options = {k: v for k, v in kwargs.items() if k not in (*_HUB_KEYS, "config", "state_dict")}
    return PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
        cls, None, config=config, state_dict=to_model_layout(state, config), **options
    )


def _resolve_dtype(kwargs: dict[str, Any], data: dict[str, Any]) -> Any:
    """``dtype`` / ``torch_dtype`` as a torch dtype (``"auto"``: the checkpoint's, float32 if it names none)."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype == "auto":
        text = data.get("text_config") or {}
        dtype = (
            data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
        )
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _load_official(
    cls: type[VLForConditionalGeneration],
    folder: Path,
    data: dict[str, Any],
    config: VLConfig | None,
    allow_pickle: bool,
    kwargs: dict[str, Any],
) -> Any:
    config = config if config is not None else VLConfig.from_qwen3_vl(data)
    options = {k: v for k, v in kwargs.items() if k not in ("dtype", "torch_dtype")}
    dtype = _resolve_dtype(kwargs, data)
    if dtype is not None:
        options["dtype"] = dtype
    loaded = _from_state_dict(cls, config, read_state_dict(folder, allow_pickle=allow_pickle), options)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return loaded


def load_pretrained(
    cls: type[VLForConditionalGeneration],
    name_or_path: str | os.PathLike[str] | None,
    model_args: tuple[Any, ...],
    *,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> Any:
    """``VLForConditionalGeneration.from_pretrained``: our format, an official Qwen3-VL(-MoE) checkpoint, or
    ``None`` with ``config`` and ``state_dict``."""
    config = kwargs.get("config")
    if name_or_path is None:
        state = kwargs.get("state_dict")
        if not isinstance(config, VLConfig) or state is None:
            raise ValueError("from_pretrained(None, ...) needs config=VLConfig(...) and state_dict=...")
        return _from_state_dict(cls, config, state, kwargs)
    hub = _hub_kwargs(kwargs)
    config_file = cached_file(str(name_or_path), "config.json", **hub, _raise_exceptions_for_missing_entries=False)
    data = json.loads(Path(str(config_file)).read_text()) if config_file is not None else {}
    if data.get("model_type") in _OFFICIAL:
        folder = _resolve_dir(name_or_path, hub)
        given = config if isinstance(config, VLConfig) else None
        return _load_official(cls, folder, data, given, allow_pickle, kwargs)
    folder = _resolve_dir(name_or_path, hub)
    check_weight_files(_weight_files(folder, allow_pickle))  # refuses pickles, names broken files
    return PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
        cls, name_or_path, *model_args, **kwargs
    )


def export_qwen3_vl(
    model: VLForConditionalGeneration, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "5GB"
) -> Path:
    """Write ``model`` in the official Qwen3-VL layout (``qwen3_vl`` or ``qwen3_vl_moe`` config, Hub tensors).

    transformers' ``Qwen3VL(Moe)ForConditionalGeneration.from_pretrained(out_dir)`` loads the result.
    MoE expert tensors are written transposed as on the Hub, except when a transposed tensor would
    have the same shape (then transformers could not tell the layouts apart, so the in-memory one is kept).

    Args:
        model: Our ``VLForConditionalGeneration``.
        out_dir: Target folder (created).
        max_shard_size: Largest safetensors shard (an index is written when there are several).

    Returns:
        The folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if key.endswith(_EXPERT_SUFFIXES) and value.shape != value.transpose(1, 2).shape:
            value = value.transpose(1, 2)
        state[key] = value.detach().contiguous().cpu()
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_qwen3_vl_dict(), indent=2, default=str) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    return out
