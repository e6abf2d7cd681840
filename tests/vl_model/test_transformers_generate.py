"""Generation as transformers' GenerationTesterMixin exercises it, with transformers' Qwen3-VL(-MoE) as the oracle.

Same tiny random weights in both (dense and MoE), image + video prompts with left padding: greedy,
sampling, beam search (images are pre-encoded by ``generate`` and expanded per beam), a static cache,
no cache, assisted decoding and prompt lookup, ``return_dict_in_generate`` with scores / logits / hidden
states / attentions, continuing from ``past_key_values`` (with the prompt's ``mm_token_type_ids``), and
``resize_token_embeddings``.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from _core_helpers import batch, rel_err, saved_hf

from vl_model import VLForConditionalGeneration

NEW = 4


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request, tmp_path_factory):
    transformers.logging.set_verbosity_error()
    ref, folder = saved_hf(tmp_path_factory.mktemp("gen_tf"), request.param)
    return ref, VLForConditionalGeneration.from_pretrained(folder)


def _generate(model, inputs, **kw):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **kw)


def _one_row(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row 0 alone (assisted decoding takes batch 1): its image and video."""
    keep = inputs["attention_mask"][0].bool()
    out = {k: inputs[k][:1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    n_image = int(inputs["image_grid_thw"][0].prod())
    out["pixel_values"], out["image_grid_thw"] = inputs["pixel_values"][:n_image], inputs["image_grid_thw"][:1]
    out["pixel_values_videos"], out["video_grid_thw"] = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    return out


MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 5},
    "beam": {"do_sample": False, "num_beams": 2},
    "beam_returns_2": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    "static_cache": {"do_sample": False, "cache_implementation": "static"},
    "no_cache": {"do_sample": False, "use_cache": False},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_generation_modes_match(pair, mode: str) -> None:
    ref, ours = pair
    inputs = batch(left_pad=3)
    assert torch.equal(_generate(ours, inputs, **MODES[mode]), _generate(ref, inputs, **MODES[mode]))


@pytest.mark.parametrize("mode", ["assisted", "prompt_lookup"])
def test_assisted_decoding_matches_greedy(pair, mode: str) -> None:
    ref, ours = pair
    inputs = _one_row(batch())
    for model in (ref, ours):
        kw = {"assistant_model": model} if mode == "assisted" else {"prompt_lookup_num_tokens": 2}
        assisted = _generate(model, inputs, do_sample=False, **kw)
        assert torch.equal(assisted, _generate(model, inputs, do_sample=False))
    assert torch.equal(_generate(ours, inputs, do_sample=False), _generate(ref, inputs, do_sample=False))


def test_dict_outputs_match(pair) -> None:
    ref, ours = pair
    inputs = batch(left_pad=3)
    kw = {
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_logits": True,
        "output_hidden_states": True,
    }
    expected, got = _generate(ref, inputs, **kw), _generate(ours, inputs, **kw)
    assert type(got).__name__ == type(expected).__name__ and list(got.keys()) == list(expected.keys())
    assert torch.equal(got.sequences, expected.sequences)
    for e, g in zip(expected.logits, got.logits):
        assert rel_err(g, e) < 1e-4
    rows = inputs["attention_mask"].bool()
    assert len(got.hidden_states) == NEW and len(got.hidden_states[0]) == len(expected.hidden_states[0])
    for e, g in zip(expected.hidden_states[0], got.hidden_states[0]):  # the prompt's, every layer
        assert rel_err(g[rows], e[rows]) < 1e-4


def test_generate_output_attentions_eager(pair) -> None:
    ref, ours = pair
    inputs = batch(videos=False, left_pad=3)
    kw = {"do_sample": False, "return_dict_in_generate": True, "output_attentions": True}
    for model in pair:
        model.set_attn_implementation("eager")
    try:
        expected, got = _generate(ref, inputs, **kw), _generate(ours, inputs, **kw)
    finally:
        for model in pair:
            model.set_attn_implementation("sdpa")
    assert len(got.attentions) == len(expected.attentions) == NEW
    for e_step, g_step in zip(expected.attentions[1:], got.attentions[1:]):  # decode steps: one query
        for e, g in zip(e_step, g_step):
            assert g.shape == e.shape and rel_err(g, e) < 1e-4


@pytest.mark.parametrize("type_ids", ["prompt_length", "padded", "absent"])
def test_continue_from_past_key_values(pair, type_ids: str) -> None:
    """generate(prompt) for NEW tokens == generate(NEW - 1) then generate(1) from its cache."""
    ref, ours = pair
    inputs = batch(left_pad=3)
    kw = {"do_sample": False, "return_dict_in_generate": True, "output_scores": True, "eos_token_id": None}
    for model in (ref, ours):
        whole = model.generate(**inputs, **kw, max_new_tokens=NEW, pad_token_id=0)
        first = model.generate(**inputs, **kw, max_new_tokens=NEW - 1, pad_token_id=0)
        grown = first.sequences.shape[1] - inputs["input_ids"].shape[1]
        more = {k: v for k, v in inputs.items() if "pixel" not in k and "grid" not in k}
        more["input_ids"] = first.sequences
        more["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, grown), value=1)
        if type_ids == "padded":
            more["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, grown))
        elif type_ids == "absent":
            more.pop("mm_token_type_ids")
        last = model.generate(**more, **kw, past_key_values=first.past_key_values, max_new_tokens=1, pad_token_id=0)
        assert torch.equal(last.sequences, whole.sequences), type(model).__name__
        assert rel_err(last.scores[-1], whole.scores[-1]) < 1e-4


def test_resize_token_embeddings(pair) -> None:
    ref, ours = pair
    inputs = batch(videos=False)
    vocab = ref.config.text_config.vocab_size
    try:
        for model in (ref, ours):
            model.resize_token_embeddings(vocab + 13, pad_to_multiple_of=8, mean_resizing=False)
        bigger = ours.config.text_config.vocab_size
        assert bigger == ref.config.text_config.vocab_size == 320
        assert ours.get_input_embeddings().weight.shape[0] == ours.lm_head.weight.shape[0] == bigger
        with torch.no_grad():
            expected, got = ref(**inputs).logits, ours(**inputs).logits
            assert got.shape == expected.shape and got.shape[-1] == bigger
            real = inputs["attention_mask"].bool()
            assert rel_err(got[real][:, :vocab], expected[real][:, :vocab]) < 1e-4  # the old vocabulary's scores
            new_ids = inputs["input_ids"].clone()
            new_ids[inputs["attention_mask"].bool() & (new_ids < 240)] = bigger - 1  # ids only the new table has
            assert torch.isfinite(ours(**{**inputs, "input_ids": new_ids}).logits).all()
    finally:
        for model in (ref, ours):
            model.resize_token_embeddings(vocab, mean_resizing=False)
    assert ours.config.text_config.vocab_size == vocab


@pytest.mark.parametrize("videos", [False, True], ids=["image", "image+video"])
def test_generate_from_inputs_embeds(pair, videos: bool) -> None:
    """A prompt given as embeddings (placeholders included) generates transformers' tokens."""
    ref, ours = pair
    inputs = batch(videos=videos, left_pad=3)
    ids = inputs.pop("input_ids")
    got = {}
    for name, model in (("ref", ref), ("ours", ours)):
        model.model.rope_deltas = None
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        got[name] = _generate(model, {**inputs, "inputs_embeds": embeds}, do_sample=False)
    assert got["ours"].shape == (2, NEW)
    assert torch.equal(got["ours"], got["ref"])


def test_compiled_forward_with_static_cache(pair) -> None:
    """torch.compile (dynamo, eager backend on CPU) of the forward under a static cache gives transformers' tokens.

    ``_can_compile_fullgraph`` stays False: a full graph breaks on the data-dependent input checks.
    """
    ref, ours = pair
    inputs = batch(left_pad=3)
    kw = {"do_sample": False, "cache_implementation": "static"}
    ours.forward = torch.compile(ours.forward, backend="eager")
    try:
        got = _generate(ours, inputs, **kw)
    finally:
        del ours.forward
    assert torch.equal(got, _generate(ref, inputs, **kw))
