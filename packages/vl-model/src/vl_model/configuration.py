"""Hugging Face configs of the assembled VLM, with Qwen3-VL / Qwen3-VL-MoE field names.

- ``VLTextConfig`` (``model_type="vl_text"``): the decoder, dense or MoE (``num_experts=0`` is dense).
- ``VLVisionConfig`` (``model_type="vl_vision"``): ``Qwen3VLVisionConfig`` field names, turned into a
  ``vl_vision.VisionConfig`` by ``to_vision_config``.
- ``VLConfig`` (``model_type="vl"``): both sub-configs plus the multimodal token ids;
  ``VLConfig.from_qwen3_vl`` maps official ``qwen3_vl`` / ``qwen3_vl_moe`` configs.

Field meanings follow the Qwen3-VL technical report (arXiv 2511.21631) as encoded in
transformers' ``Qwen3VLConfig``. As with any transformers config, keys we do not know are kept as
attributes (``quantization_config``, user attributes, generic ``PreTrainedConfig`` keys), so every
``config.json`` transformers reads loads here too; a key that looks like a typo of one of our own
fields (``hiden_size``) draws a warning naming the near match, so a typo never silently builds
another model unnoticed.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any, ClassVar

from transformers import GenerationConfig, PretrainedConfig

from vl_rope import RopeScaling
from vl_vision import VisionConfig

__all__ = ["VLConfig", "VLTextConfig", "VLVisionConfig"]

# Keys every PreTrainedConfig may carry (saved by to_dict, passed by from_pretrained or by users).
_GENERIC_KEYS = frozenset(
    {
        "architectures",
        "attn_implementation",
        "experts_implementation",
        "torch_dtype",
        "dtype",
        "name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "per_layer_config",
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "transformers_version",
        "model_type",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "chunk_size_feed_forward",
        "tie_encoder_decoder",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "pruned_heads",
        "torchscript",
        "use_return_dict",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tie_word_embeddings",
        "rope_scaling",
        "rope_theta",
        "use_cache",
        "sliding_window",
        "max_window_layers",
        "use_sliding_window",
        "layer_types",
        "output_router_logits",
        "auto_map",
    }
)


def _warn_near_misses(config_name: str, kwargs: dict[str, Any], known: set[str]) -> None:
    """Warn about every unknown key that is a near match of one of our fields (a likely typo).

    Other unknown keys are kept silently, as transformers keeps them (``quantization_config``, user
    attributes, keys of newer transformers versions).
    """
    generic = _GENERIC_KEYS | set(GenerationConfig._get_default_generation_params())
    for key in sorted(k for k in kwargs if k not in generic and k not in known and not k.startswith("_")):
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if near:
            warnings.warn(
                f"{config_name} got the unknown key {key!r} (kept as an attribute; the model does not read it): "
                f"did you mean {near[0]!r}?",
                UserWarning,
                stacklevel=2,
            )


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class VLTextConfig(PretrainedConfig):
    """The decoder: Qwen3 attention (q/k RMSNorm, GQA), interleaved MRoPE, dense SwiGLU or MoE MLPs.

    ``rope_parameters`` holds ``rope_type``, ``rope_theta``, ``mrope_section`` (frequencies per T/H/W
    axis, summing to ``head_dim / 2``), ``mrope_interleaved`` and any YaRN/linear/dynamic scaling keys.
    MoE layers are used when ``num_experts > 0`` for every layer ``i`` not in ``mlp_only_layers`` with
    ``(i + 1) % decoder_sparse_step == 0``.
    """

    model_type = "vl_text"
    base_config_key = "text_config"
    default_theta = 5_000_000.0
    ignore_keys_at_rope_validation = {"mrope_section", "mrope_interleaved"}  # noqa: RUF012

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    moe_backend: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        _warn_near_misses("VLTextConfig", kwargs, _field_names(type(self)))
        for key in ("sliding_window", "max_window_layers", "use_sliding_window", "layer_types"):
            kwargs.pop(key, None)  # Qwen3-VL-MoE text configs carry these but never use them
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        super().__post_init__(**kwargs)
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", self.default_theta)
        rope.setdefault("mrope_section", [24, 20, 20])
        rope.setdefault("mrope_interleaved", True)
        self.rope_parameters = rope
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        section = rope["mrope_section"]
        if len(section) != 3 or any(int(s) < 0 for s in section):
            raise ValueError(f"mrope_section must be three non-negative sizes (t, h, w), got {list(section)}")
        # the interleaved layout reads any section (see _decoder.rotary_sections), as transformers does;
        # chunked sections must cover the rotary frequencies exactly
        if not rope["mrope_interleaved"] and sum(section) != self.head_dim // 2:
            raise ValueError(
                f"chunked mrope_section {list(section)} sums to {sum(section)} but head_dim "
                f"{self.head_dim} has {self.head_dim // 2} rotary frequencies"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` uses the sparse MoE block (else the dense SwiGLU MLP)."""
        if self.num_experts <= 0 or layer_idx in (self.mlp_only_layers or []):
            return False
        return (layer_idx + 1) % max(self.decoder_sparse_step, 1) == 0

    def rope_scaling_spec(self) -> RopeScaling | None:
        """The ``vl_rope.RopeScaling`` of ``rope_parameters`` (None without context extension)."""
        rope = self.rope_parameters or {}
        kind = rope.get("rope_type", "default")
        if kind in ("default", "mrope"):
            return None
        fields = {
            k: rope[k]
            for k in (
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            )
            if rope.get(k) is not None
        }
        return RopeScaling(rope_type=kind, max_position_embeddings=self.max_position_embeddings, **fields)


class VLVisionConfig(PretrainedConfig):
    """The vision tower, with ``Qwen3VLVisionConfig`` field names (see ``vl_vision.VisionConfig``)."""

    model_type = "vl_vision"
    base_config_key = "vision_config"
    attribute_map: ClassVar[dict[str, str]] = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] | tuple[int, ...] = (8, 16, 24)
    initializer_range: float = 0.02
    rope_parameters: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        _warn_near_misses("VLVisionConfig", kwargs, _field_names(type(self)))
        self.deepstack_visual_indexes = list(self.deepstack_visual_indexes)
        super().__post_init__(**kwargs)

    def to_vision_config(self, **overrides: Any) -> VisionConfig:
        """The ``vl_vision.VisionConfig`` our ``VisionTransformer`` is built from."""
        data = {k: getattr(self, k) for k in _field_names(VLVisionConfig) if k != "rope_parameters"}
        data = {k: v for k, v in data.items() if k in _field_names(VisionConfig)}
        rope = self.rope_parameters or {}
        if "rope_theta" in rope:
            data["rope_theta"] = float(rope["rope_theta"])
        data.update(overrides)
        return VisionConfig.from_hf(data)


class VLConfig(PretrainedConfig):
    """The assembled VLM: ``text_config`` + ``vision_config`` + multimodal token ids.

    Example:
        >>> cfg = VLConfig(text_config={"hidden_size": 64, "num_hidden_layers": 2}, vision_config={"depth": 2})
        >>> cfg.model_type, cfg.text_config.model_type
        ('vl', 'vl_text')
    """

    model_type = "vl"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {"text_config": VLTextConfig, "vision_config": VLVisionConfig}
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    # a dict or None on input; a VLTextConfig / VLVisionConfig after __post_init__
    text_config: Any = None
    vision_config: Any = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        _warn_near_misses("VLConfig", kwargs, _field_names(type(self)))
        for key in ("text_config", "vision_config"):
            sub = getattr(self, key)
            if isinstance(sub, dict) and str(sub.get("model_type", "")).startswith("qwen3_vl"):
                sub = {k: v for k, v in sub.items() if k != "model_type"}
                setattr(self, key, sub)
        super().__post_init__(**kwargs)

    @classmethod
    def from_qwen3_vl(cls, hf_config: Any, **overrides: Any) -> VLConfig:
        """Map an official ``qwen3_vl`` / ``qwen3_vl_moe`` config (object or dict) to a ``VLConfig``.

        Args:
            hf_config: A ``Qwen3VLConfig`` / ``Qwen3VLMoeConfig`` or its ``to_dict()``.
            **overrides: Top-level ``VLConfig`` fields to set on top.

        Raises:
            ValueError: Another ``model_type``.
        """
        data = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
        model_type = data.get("model_type")
        if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            raise ValueError(f"expected a 'qwen3_vl' or 'qwen3_vl_moe' config, got model_type={model_type!r}")
        text = {k: v for k, v in dict(data.pop("text_config", None) or {}).items() if k != "model_type"}
        vision = {k: v for k, v in dict(data.pop("vision_config", None) or {}).items() if k != "model_type"}
        if "num_local_experts" in text:  # transformers' attribute_map name of num_experts
            text["num_experts"] = text.pop("num_local_experts")
        if model_type == "qwen3_vl":
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                text.pop(key, None)
            text["num_experts"] = 0
        tie = bool(data.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = tie
        top = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "auto_map")}
        top.update(overrides)
        return cls(text_config=text, vision_config=vision, **top)

    def to_qwen3_vl_dict(self) -> dict[str, Any]:
        """The official ``config.json`` content: ``qwen3_vl`` (dense) or ``qwen3_vl_moe``."""
        moe = self.text_config.num_experts > 0
        model_type = "qwen3_vl_moe" if moe else "qwen3_vl"
        text = self.text_config.to_dict()
        for key in ("moe_backend", "norm_topk_prob") if not moe else ("moe_backend",):
            text.pop(key, None)
        if not moe:
            for key in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "decoder_sparse_step",
                "mlp_only_layers",
                "router_aux_loss_coef",
                "output_router_logits",
                "tie_word_embeddings",
            ):
                text.pop(key, None)
        text["model_type"] = f"{model_type}_text"
        vision = self.vision_config.to_dict()
        vision["model_type"] = f"{model_type}_vision"
        arch = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
        out = {
            "architectures": [arch],
            "model_type": model_type,
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for key in ("transformers_version", "dtype"):
            value = self.to_dict().get(key)
            if value is not None and not isinstance(value, str):
                value = str(value).removeprefix("torch.")
            if value is not None:
                out[key] = value
        return out
