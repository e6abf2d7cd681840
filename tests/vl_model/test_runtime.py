"""One interface test suite for both model classes (``vl_model.runtime.TrainableVLM``).

Every model that training code takes (the core ``VLForConditionalGeneration``, dense and MoE, and
composed models of three LM families, 1-D and MRoPE positions) must give hidden states that its own
``forward`` projects to the same logits, keep packed samples apart, list its blocks and parts, and say
how it routes experts. A composed Qwen3 + MRoPE model is the same network as the core model, so
their hidden states must agree too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _compose_helpers import IMAGE, TOKEN_IDS, lm_config, qwen3_vl_twin, vision_config
from transformers import Qwen3MoeConfig

from vl_model import PARTS, TrainableVLM, VLConfig, VLForConditionalGeneration, compose
from vl_model.runtime import segment_positions

VSTART, VEND = TOKEN_IDS["vision_start_token_id"], TOKEN_IDS["vision_end_token_id"]


def _core(moe: bool = False) -> VLForConditionalGeneration:
    torch.manual_seed(0)
    twin = qwen3_vl_twin(compose(vision_config(), lm_config("qwen3"), position_style="mrope", **TOKEN_IDS))
    data = twin.config.to_dict()
    if moe:
        data["model_type"] = "qwen3_vl_moe"
        data["text_config"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        data["text_config"]["router_aux_loss_coef"] = 0.25
    return VLForConditionalGeneration(VLConfig.from_qwen3_vl(data)).eval()


def _composed(family: str, style: str = "1d") -> Any:
    torch.manual_seed(0)
    return compose(vision_config(), lm_config(family), position_style=style, **TOKEN_IDS).eval()


def _composed_moe() -> Any:
    torch.manual_seed(0)
    lm = Qwen3MoeConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
        max_position_embeddings=256,
    )
    return compose(vision_config(), lm, **TOKEN_IDS).eval()


MODELS: dict[str, Callable[[], Any]] = {
    "core": _core,
    "core-moe": lambda: _core(moe=True),
    "qwen3-1d": lambda: _composed("qwen3"),
    "qwen3-mrope": lambda: _composed("qwen3", "mrope"),
    "qwen2-1d": lambda: _composed("qwen2"),
    "llama-mrope": lambda: _composed("llama", "mrope"),
    "qwen3moe-1d": _composed_moe,
}


MOE = {"core-moe": 0.25, "qwen3moe-1d": 0.5}
"""The MoE models and their balance-loss coefficients."""


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    built = MODELS[request.param]()
    built.test_name = request.param
    return built


def _sample_with_image(seed: int) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = [1, 2, VSTART] + [IMAGE] * 4 + [VEND, 5, 6, 7]
    return ids, torch.randn(16, 96, generator=g)


def _padded_batch() -> dict[str, torch.Tensor]:
    """Two rows, each with one image; row 1 right-padded by 3."""
    a, pa = _sample_with_image(0)
    b, pb = _sample_with_image(1)
    b = b[:-3]
    width = len(a)
    ids = torch.tensor([a, b + [0] * (width - len(b))])
    mask = torch.tensor([[1] * width, [1] * len(b) + [0] * (width - len(b))])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.cat([pa, pb]),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
    }


def test_both_classes_implement_the_interface(model: Any) -> None:
    assert isinstance(model, TrainableVLM)


def test_hidden_states_project_to_the_forward_logits(model: Any) -> None:
    batch = _padded_batch()
    with torch.no_grad():
        hidden = model.forward_hidden(**batch).last_hidden_state
        logits = model(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close((hidden @ model.output_weight().T)[keep], logits[keep], rtol=1e-4, atol=1e-5)


def test_packed_samples_stay_apart(model: Any) -> None:
    a, pa = _sample_with_image(2)
    b = [9, 8, 7, 6, 5]
    row = torch.tensor([a + b + [0, 0]])
    segments = torch.tensor([[0] * len(a) + [1] * len(b) + [-1, -1]])
    with torch.no_grad():
        packed = model.forward_hidden(
            input_ids=row,
            attention_mask=(segments >= 0).long(),
            segment_ids=segments,
            pixel_values=pa,
            image_grid_thw=torch.tensor([[1, 4, 4]]),
        ).last_hidden_state[0]
        alone_a = model.forward_hidden(
            input_ids=torch.tensor([a]), pixel_values=pa, image_grid_thw=torch.tensor([[1, 4, 4]])
        ).last_hidden_state[0]
        alone_b = model.forward_hidden(input_ids=torch.tensor([b])).last_hidden_state[0]
    torch.testing.assert_close(packed[: len(a)], alone_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[len(a) : len(a) + len(b)], alone_b, rtol=1e-4, atol=1e-5)


def test_output_weight_is_the_head_parameter(model: Any) -> None:
    assert model.output_weight() is model.get_output_embeddings().weight


def test_blocks_are_listed(model: Any) -> None:
    layers = model.decoder_layers()
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    tower = model.vision_tower()
    assert len(tower.blocks) == 2 and hasattr(tower, "merger") and len(tower.deepstack_merger_list) == 2


def test_parts_cover_every_parameter_once(model: Any) -> None:
    owner: dict[int, str] = {}
    for part in PARTS:
        for item in model.part_modules(part):
            params = [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
            for p in params:
                assert owner.setdefault(id(p), part) == part, f"a parameter is in {owner[id(p)]} and {part}"
    assert {id(p) for p in model.parameters()} == set(owner)
    with pytest.raises(ValueError, match="unknown part 'tower'"):
        model.part_modules("tower")


def test_moe_routing(model: Any) -> None:
    routing = model.moe_routing()
    batch = _padded_batch()
    if model.test_name not in MOE:
        assert routing is None
        with torch.no_grad():
            assert model.forward_hidden(**batch, output_router_logits=True).router_logits is None
        return
    assert routing is not None
    assert (routing.num_experts, routing.top_k, routing.aux_coef) == (4, 2, MOE[model.test_name])
    with torch.no_grad():
        logits = model.forward_hidden(**batch, output_router_logits=True).router_logits
        assert model.forward_hidden(**batch).router_logits is None
    assert logits is not None and len(logits) == 2
    assert all(t.shape == (batch["input_ids"].numel(), 4) for t in logits)


def test_composed_qwen3_mrope_is_the_core_network() -> None:
    composed = _composed("qwen3", "mrope")
    twin = qwen3_vl_twin(composed)
    core = VLForConditionalGeneration(VLConfig.from_qwen3_vl(twin.config.to_dict())).eval()
    core.load_state_dict(twin.state_dict())
    batch = _padded_batch()
    a, pa = _sample_with_image(3)
    packed = {
        "input_ids": torch.tensor([[*a, 4, 5, 6]]),
        "segment_ids": torch.tensor([[0] * len(a) + [1, 1, 1]]),
        "pixel_values": pa,
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    with torch.no_grad():
        for inputs in (batch, packed):
            ours = composed.forward_hidden(**inputs).last_hidden_state
            want = core.forward_hidden(**inputs).last_hidden_state
            keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            torch.testing.assert_close(ours[keep], want[keep], rtol=1e-4, atol=1e-5)


def test_segment_positions_restart_per_run() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 1, 1, 1, 2, 2, 2]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])
    assert torch.equal(segment_positions(segments), want)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        segment_positions(torch.zeros(3, dtype=torch.long))
