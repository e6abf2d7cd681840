"""Checkpoint interop: load official ``qwen3_vl`` / ``qwen3_vl_moe`` checkpoints, export them back.

One adapter per format (the torchtitan ``state_dict_adapter`` idea): our in-memory keys equal
transformers' Qwen3-VL keys, so the only conversion is the MoE expert layout. Hub files of
Qwen3-VL-MoE store ``experts.gate_up_proj`` as ``[E, H, 2I]`` and ``experts.down_proj`` as
``[E, I, H]``; in memory (transformers 5.x and ``vl_moe``) they are ``[E, 2I, H]`` / ``[E, H, I]``.
Like transformers' ``Transpose(1, 2, check_dims=True)`` conversion, a tensor whose shape already
matches the model is kept and a transposed one is transposed, so both layouts load.

Safe by default: only safetensors are read; a pickled ``pytorch_model.bin`` is refused unless
``allow_pickle=True``, and even then it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import cached_file

from .configuration import VLConfig

if TYPE_CHECKING:
    from .modeling import VLForConditionalGeneration

__all__ = ["export_qwen3_vl", "load_pretrained", "read_state_dict", "to_model_layout"]

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


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [folder / f for f in files]
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


def read_state_dict(folder: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded with an index), on CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder), allow_pickle):
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(str(path), map_location="cpu", weights_only=True))
    return state


def to_model_layout(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Transpose Hub-layout MoE expert tensors to the model's shapes; leave every other tensor as is."""
    params = dict(model.state_dict())
    out = dict(state)
    for key, value in state.items():
        if key.endswith(_EXPERT_SUFFIXES) and key in params and value.dim() == 3:
            want = params[key].shape
            if value.shape != want and value.transpose(1, 2).shape == want:
                out[key] = value.transpose(1, 2).contiguous()
    return out


def _check_keys(model: PreTrainedModel, state: dict[str, torch.Tensor], source: str) -> None:
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not match the model: {len(missing)} missing key(s) {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; {len(unexpected)} unexpected key(s) {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    for key, value in state.items():
        want = model.state_dict()[key].shape
        if value.shape != want:
            raise ValueError(
                f"checkpoint {source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(want)}"
            )


def _load_official(
    cls: type[VLForConditionalGeneration],
    folder: Path,
    data: dict[str, Any],
    allow_pickle: bool,
    kwargs: dict[str, Any],
) -> VLForConditionalGeneration:
    config = VLConfig.from_qwen3_vl(data)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        dtype = getattr(torch, str(data.get("dtype") or data.get("torch_dtype") or "float32"))
    build: dict[str, Any] = {}
    if dtype is not None:
        build["dtype"] = dtype
    if kwargs.get("attn_implementation") is not None:
        build["attn_implementation"] = kwargs["attn_implementation"]
    model = cls._from_config(config, **build)
    state = to_model_layout(read_state_dict(folder, allow_pickle=allow_pickle), model)
    _check_keys(model, state, str(folder))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    device = kwargs.get("device_map")
    if isinstance(device, str | torch.device) and str(device) != "auto":
        model.to(device)
    return model.eval()


def load_pretrained(
    cls: type[VLForConditionalGeneration],
    name_or_path: str | os.PathLike[str],
    model_args: tuple[Any, ...],
    *,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> Any:
    """``VLForConditionalGeneration.from_pretrained``: our format, or an official Qwen3-VL(-MoE) checkpoint."""
    hub = _hub_kwargs(kwargs)
    config = kwargs.get("config")
    if not isinstance(config, VLConfig):
        config_file = cached_file(str(name_or_path), "config.json", **hub)
        data = json.loads(Path(str(config_file)).read_text())
        if data.get("model_type") in _OFFICIAL:
            folder = _resolve_dir(name_or_path, hub)
            return _load_official(cls, folder, data, allow_pickle, kwargs)
        folder = Path(str(config_file)).parent
    else:
        folder = _resolve_dir(name_or_path, hub)
    _weight_files(folder, allow_pickle)  # refuses pickles before transformers would read them
    want_info = bool(kwargs.pop("output_loading_info", False))
    model, info = PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
        cls, name_or_path, *model_args, output_loading_info=True, **kwargs
    )
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {name_or_path} does not match the model: {len(missing)} missing key(s) {missing[:20]}; "
            f"{len(unexpected)} unexpected key(s) {unexpected[:20]}; {len(mismatched)} shape mismatch(es) "
            f"{mismatched[:5]}"
        )
    return (model, info) if want_info else model


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
