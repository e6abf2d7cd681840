"""The VLM's vision tower: vl-vision's ``VisionTransformer`` with what transformers reads off a sub-model.

transformers' composite models keep their vision tower as a ``PreTrainedModel``, and code written
for them (its own tests, trainers, PEFT, accelerate) reads capability flags off it:
``model.model.visual._supports_sdpa``, ``.config._attn_implementation``, ``.dtype``, ``.device``. Our
tower is vl-vision's plain ``nn.Module`` (its keys already equal transformers' ``model.visual.*``), so
this subclass adds those attributes without changing a key or a computation.

Notation: ``N`` patches, ``n`` images/videos.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vl_vision import VisionConfig, VisionTransformer

__all__ = ["VISION_ATTN", "VLVisionTower"]

# transformers' attention names -> the vision tower's backends
VISION_ATTN = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash", "flash_attention_3": "flash"}


class VLVisionTower(VisionTransformer):
    """``VisionTransformer`` carrying transformers' ``PreTrainedModel`` capability flags.

    Args:
        config: The tower's ``vl_vision.VisionConfig``.
        attn_implementation: The transformers name of the attention in use (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``), reported as ``config._attn_implementation``.
    """

    input_modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["VisionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config: VisionConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config)
        self._record_implementation(attn_implementation)

    def _record_implementation(self, name: str) -> None:
        # the dataclass has no such field: an instance attribute, read as transformers reads its configs
        object.__setattr__(self.config, "_attn_implementation", name)

    def set_attn_implementation(self, name: str) -> None:
        """Switch every block's attention; ``name`` is a transformers name or a vl-vision backend."""
        backend = VISION_ATTN.get(name, name if name in ("sdpa", "eager", "flash") else "sdpa")
        super().set_attn_implementation(backend)
        self._record_implementation(name if name in VISION_ATTN else {"flash": "flash_attention_2"}.get(name, backend))

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.patch_embed.proj.weight.device
