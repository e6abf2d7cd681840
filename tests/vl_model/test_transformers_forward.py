"""Forward behaviours a transformers user can observe, with transformers' Qwen3-VL(-MoE) class as the oracle.

Both models hold the same tiny random weights (dense and MoE). Covered: padding-free packing through
restarting ``position_ids`` (sdpa, eager; the FlashAttention varlen arguments), ``shift_labels``, the
tuple of ``return_dict=False``, ``output_attentions``, ``output_hidden_states`` (argument and configs),
``return_dict`` from the config, the feature getters' output types, ``model.model.get_rope_index``, image
placeholder runs under the padding mask, the MoE router logits and balance loss.
"""

from __future__ import annotations

import pytest
import torch
from _core_helpers import IMAGE, PATCH_DIM, VISION_END, VISION_START, batch, masked, rel_err, saved_hf
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from vl_model import VLForConditionalGeneration


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref, folder = saved_hf(tmp_path_factory.mktemp("fwd"), request.param)
    return ref, VLForConditionalGeneration.from_pretrained(folder)


def _both(pair, impl: str):
    ref, ours = pair
    ref.set_attn_implementation(impl)
    ours.set_attn_implementation(impl)
    return ref, ours


@pytest.fixture(autouse=True)
def _back_to_sdpa(pair):
    yield
    for model in pair:
        model.set_attn_implementation("sdpa")


def _packed_text(seed: int = 0) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Three text samples of odd lengths and their padding-free row (DataCollatorWithFlattening's layout)."""
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(1, 240, (1, n), generator=g) for n in (7, 5, 9)]
    row = {
        "input_ids": torch.cat(samples, 1),
        "position_ids": torch.cat([torch.arange(s.shape[1]) for s in samples])[None],
    }
    return samples, row


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_free_position_ids_do_not_attend_across_samples(pair, impl: str) -> None:
    ref, ours = _both(pair, impl)
    samples, row = _packed_text()
    with torch.no_grad():
        expected = ref(**row, use_cache=False).logits[0]  # transformers packs only without a cache
        got = ours(**row, use_cache=False).logits[0]
        got_default = ours(**row).logits[0]  # a fresh cache is no reason to attend across samples
        apart = torch.cat([ours(input_ids=s).logits[0] for s in samples])
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, apart) < 1e-4
    assert rel_err(got_default, apart) < 1e-4


def test_padding_free_with_a_batch_of_rows(pair) -> None:
    """Two packed rows (the second restarting mid-row) equal transformers without a cache."""
    ref, ours = pair
    _, row = _packed_text(1)
    ids = torch.cat([row["input_ids"], row["input_ids"].flip(1)])
    pos = torch.cat([row["position_ids"], torch.cat([torch.arange(12), torch.arange(9)])[None]])
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        got = ours(input_ids=ids, position_ids=pos).logits
    assert rel_err(got, expected) < 1e-4


def test_flash_gets_varlen_arguments_from_restarting_positions(pair) -> None:
    """FlashAttention (GPU only) gets the cu_seqlens transformers derives from the same positions."""
    _, ours = pair
    text_model = ours.model.language_model
    _, row = _packed_text()
    from vl_model._attention import segments_from_positions

    segments = segments_from_positions(row["position_ids"], 1)
    assert segments is not None and segments.tolist() == [[0] * 7 + [1] * 5 + [2] * 9]
    saved = text_model.config._attn_implementation_internal
    text_model.config._attn_implementation_internal = "flash_attention_2"
    try:
        embeds = torch.zeros(1, row["input_ids"].shape[1], 64)
        mask, kwargs = text_model._mask(embeds, None, None, segments, {})
    finally:
        text_model.config._attn_implementation_internal = saved
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(row["position_ids"])
    assert mask is None
    assert kwargs["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert kwargs["max_length_q"] == int(max_q) == int(max_k)


def test_monotonic_positions_keep_the_plain_causal_mask() -> None:
    from vl_model._attention import segments_from_positions

    assert segments_from_positions(torch.arange(9)[None], 2) is None


def test_inputs_embeds_forward(pair) -> None:
    """Embeddings instead of ids: transformers' positions (cached deltas, or plain ones on a fresh model)."""
    ref, ours = pair
    inputs = batch(left_pad=3)
    ids = inputs.pop("input_ids")
    mask = inputs["attention_mask"]
    for fresh in (True, False):
        got = {}
        for name, model in (("ref", ref), ("ours", ours)):
            with torch.no_grad():
                if fresh:
                    model.model.rope_deltas = None
                else:
                    model(input_ids=ids, **inputs)  # leaves this batch's rope deltas behind, as in transformers
                got[name] = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs).logits
        assert rel_err(masked(got["ours"], mask), masked(got["ref"], mask)) < 1e-4


def test_batching_equivalence(pair) -> None:
    """Each row of a left-padded batch gives the logits it gives alone (transformers' test_batching_equivalence)."""
    _, ours = pair
    inputs = batch(videos=False, left_pad=3)
    with torch.no_grad():
        together = ours(**inputs).logits
        for row, n_patches in ((0, (0, 24)), (1, (24, 40))):
            keep = inputs["attention_mask"][row].bool()
            alone = ours(
                input_ids=inputs["input_ids"][row : row + 1, keep],
                pixel_values=inputs["pixel_values"][n_patches[0] : n_patches[1]],
                image_grid_thw=inputs["image_grid_thw"][row : row + 1],
            ).logits[0]
            assert rel_err(together[row, keep], alone) < 1e-4


def _labels(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, : labels.shape[1] // 3] = -100
    return labels


def test_shift_labels_are_honoured(pair) -> None:
    ref, ours = pair
    inputs = batch()
    labels = _labels(inputs)
    # targets already aligned with positions, deliberately not labels shifted by one
    shift = torch.roll(labels, shifts=-2, dims=1)
    shift[:, -2:] = -100
    with torch.no_grad():
        expected = ref(**inputs, labels=labels, shift_labels=shift).loss
        got = ours(**inputs, labels=labels, shift_labels=shift)
        lean = ours(**inputs, labels=labels, shift_labels=shift, return_logits=False).loss
        plain = ours(**inputs, labels=labels).loss
    assert abs(float(got.loss) - float(expected)) < 1e-4 * float(expected)
    assert abs(float(lean) - float(expected)) < 1e-4 * float(expected)
    assert abs(float(plain) - float(expected)) > 1e-3  # the shifted targets really changed the loss


def _same(a, b) -> None:
    """Equal structure; tensors close; caches of the same type."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, (type(b), getattr(b, "shape", None), a.shape)
        assert rel_err(b.float(), a.float()) < 1e-4
    elif isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b), (len(a), len(b))
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert type(a).__name__ == type(b).__name__


@pytest.mark.parametrize("with_labels", [False, True], ids=["logits", "loss"])
def test_return_dict_false_gives_transformers_tuple(pair, with_labels: bool) -> None:
    ref, ours = pair
    inputs = batch(videos=False, left_pad=0)
    kw = {"return_dict": False}
    if with_labels:
        kw["labels"] = _labels(inputs)
    if ref.config.model_type == "qwen3_vl_moe":
        kw["output_router_logits"] = True
    with torch.no_grad():
        expected, got = ref(**inputs, **kw), ours(**inputs, **kw)
    assert isinstance(got, tuple)
    _same(expected, got)


def test_moe_router_logits_and_balance_loss_match(pair) -> None:
    ref, ours = pair
    if ref.config.model_type != "qwen3_vl_moe":
        pytest.skip("dense model: no router")
    inputs = batch()
    labels = _labels(inputs)
    with torch.no_grad():
        expected = ref(**inputs, labels=labels, output_router_logits=True)
        got = ours(**inputs, labels=labels, output_router_logits=True)
    _same(expected.router_logits, got.router_logits)
    assert abs(float(got.aux_loss) - float(expected.aux_loss)) < 1e-4 * float(expected.aux_loss)
    assert abs(float(got.loss) - float(expected.loss)) < 1e-4 * float(expected.loss)


def test_output_attentions_eager(pair) -> None:
    ref, ours = _both(pair, "eager")
    inputs = batch()
    with torch.no_grad():
        expected = ref(**inputs, output_attentions=True).attentions
        got = ours(**inputs, output_attentions=True).attentions
    assert len(got) == ref.config.text_config.num_hidden_layers
    rows = inputs["attention_mask"].bool()
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        assert rel_err(g.transpose(1, 2)[rows], e.transpose(1, 2)[rows]) < 1e-4  # real queries


def test_output_attentions_sdpa_is_empty_like_transformers(pair) -> None:
    ref, ours = pair
    inputs = batch(videos=False)
    with torch.no_grad():
        expected = ref(**inputs, output_attentions=True).attentions
        got = ours(**inputs, output_attentions=True).attentions
    assert got == expected == ()


def test_output_hidden_states(pair) -> None:
    ref, ours = pair
    inputs = batch()
    with torch.no_grad():
        expected = ref(**inputs, output_hidden_states=True).hidden_states
        got = ours(**inputs, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == ref.config.text_config.num_hidden_layers + 1
    rows = inputs["attention_mask"]
    for e, g in zip(expected, got):
        assert rel_err(masked(g, rows), masked(e, rows)) < 1e-4


@pytest.mark.parametrize("where", ["text_config", "config"])
def test_output_hidden_states_from_the_config(pair, where: str) -> None:
    ref, ours = pair
    inputs = batch(videos=False)
    for model in (ref, ours):
        target = model.config.text_config if where == "text_config" else model.config
        target.output_hidden_states = True
    try:
        with torch.no_grad():
            got = ours(**inputs).hidden_states
            expected = ref(**inputs).hidden_states
            off = ours(**inputs, output_hidden_states=False).hidden_states
    finally:
        for model in (ref, ours):
            model.config.output_hidden_states = model.config.text_config.output_hidden_states = False
    assert got is not None and len(got) == ref.config.text_config.num_hidden_layers + 1
    assert off is None
    if where == "text_config":  # transformers' Qwen3-VL reads the switch from its text config only
        _same(expected, got)


def test_return_dict_from_the_config(pair) -> None:
    _, ours = pair
    inputs = batch(videos=False)
    ours.config.return_dict = False
    try:
        with torch.no_grad():
            as_tuple = ours(**inputs)
            base = ours.model(**inputs)
            forced = ours(**inputs, return_dict=True)
    finally:
        ours.config.return_dict = True
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert torch.equal(as_tuple[0], forced.logits)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_feature_getters_return_transformers_types(pair, kind: str) -> None:
    ref, ours = pair
    inputs = batch()
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    args = (inputs[key], inputs[f"{kind}_grid_thw"])
    with torch.no_grad():
        expected = getattr(ref, f"get_{kind}_features")(*args)
        got = getattr(ours, f"get_{kind}_features")(*args)
        as_tuple = getattr(ours.model, f"get_{kind}_features")(*args, return_dict=False)
    assert list(got.keys()) == list(expected.keys())
    assert isinstance(got.pooler_output, tuple) and len(got.pooler_output) == len(args[1])
    _same(expected.pooler_output, got.pooler_output)
    _same(expected.deepstack_features, got.deepstack_features)
    _same(expected.last_hidden_state, got.last_hidden_state)
    _same(expected.to_tuple(), as_tuple)


def test_get_rope_index_on_the_base_model(pair) -> None:
    ref, ours = pair
    inputs = batch(left_pad=3)
    args = dict(
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    expected_pos, expected_deltas = ref.model.get_rope_index(inputs["input_ids"], **args)
    got_pos, got_deltas = ours.model.get_rope_index(inputs["input_ids"], **args)
    real = inputs["attention_mask"].bool()
    assert torch.equal(got_pos[:, real], expected_pos[:, real])
    assert torch.equal(got_deltas.flatten(), expected_deltas.flatten())


def _masked_image_batch() -> dict[str, torch.Tensor]:
    """Row 1's left padding holds a whole image placeholder run (its grid listed, its tokens masked)."""
    g = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(1, 240, (n,), generator=g).tolist()
    run = [VISION_START] + [IMAGE] * 4 + [VISION_END]
    row0 = text(3) + run + text(9)
    hidden, row1 = text(2) + run, text(2) + run + text(2)
    ids = torch.tensor([row0, hidden + row1])
    mask = torch.ones_like(ids)
    mask[1, : len(hidden)] = 0
    grid = torch.tensor([[1, 4, 4]] * 3)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).long() * mask,
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


@pytest.mark.parametrize("type_ids", [True, False], ids=["mm_token_type_ids", "placeholder-ids"])
def test_placeholder_run_under_the_padding_mask(pair, type_ids: bool) -> None:
    ref, ours = pair
    inputs = _masked_image_batch()
    with torch.no_grad():
        expected = ref(**inputs).logits
        if not type_ids:
            inputs.pop("mm_token_type_ids")
        got = ours(**inputs).logits
        generated = ours.generate(**inputs, max_new_tokens=3, do_sample=False)
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
