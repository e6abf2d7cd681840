"""Rollouts: shapes and masks, EOS handling, forced answers, determinism, one vision pass per batch, KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _rl_helpers import ScriptedModel, ids, samples, tiny
from _threads import one_thread

from vl_rl.rollout import (
    DEFAULT_ANSWER_CUE,
    HFRolloutEngine,
    concat_rollouts,
    prompt_text,
    rollout_logprobs,
    select_rows,
    subset_groups,
)
from vl_train.data.synthetic import verify


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    return tiny()


def test_shapes_masks_and_several_images(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    mixed = samples(3, tasks=("count", "colour", "compare"))  # prompts of different lengths and image counts
    torch.manual_seed(0)
    out = HFRolloutEngine(model, processor, max_new_tokens=5, thinking=False).generate(mixed, 2)
    rows = 6
    assert out.sequences.shape[0] == rows and out.group_size == 2 and len(out.texts) == rows
    steps = out.sequences.shape[1] - out.prompt_length
    assert out.completion_mask.shape == (rows, steps) and out.completion_mask.dtype == torch.bool
    assert 1 <= steps <= 5 and out.truncated.shape == (rows,)
    attention = out.model_inputs["attention_mask"]
    assert attention.shape == out.sequences.shape
    assert (attention[:, out.prompt_length :].bool() >= out.completion_mask).all()  # trained tokens are attended
    lengths = attention[:, : out.prompt_length].sum(1)
    assert len(set(lengths.tolist())) > 1  # left padding of prompts of different lengths
    assert (attention[:, : out.prompt_length].cumsum(1)[:, -1] == lengths).all()
    # visual inputs line up with the placeholders: every image of every row, in row order
    grids = out.model_inputs["image_grid_thw"]
    assert grids.shape[0] == sum(out.images_per_row) >= rows
    assert out.model_inputs["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    merged = int((out.sequences[:, : out.prompt_length] == model.config.image_token_id).sum())
    assert merged == int(grids.prod(-1).sum()) // 4
    assert [s["id"] for s in out.row_samples] == [s["id"] for s in mixed for _ in range(2)]


def _script_engine(processor: Any, script: Any, **kwargs: Any) -> tuple[HFRolloutEngine, ScriptedModel]:
    fake = ScriptedModel(script)
    return HFRolloutEngine(fake, processor, **kwargs), fake


def test_eos_ends_the_response_and_no_eos_is_truncation(policy: tuple[Any, Any]) -> None:
    _, processor = policy
    eos = processor.tokenizer.eos_token_id
    answer, rambling = [*ids(processor, "3"), eos], ids(processor, "one two three four")
    engine, _ = _script_engine(processor, lambda k, x: [answer, rambling], max_new_tokens=6, thinking=False)
    out = engine.generate(samples(1), 2)
    assert out.texts[0] == "3" and out.truncated.tolist() == [False, True]
    assert out.completion_mask[0].tolist() == [True] * len(answer) + [False] * (6 - len(answer))
    assert out.completion_mask[1].all()  # truncated without <think>: no forced answer
    assert out.model_inputs["attention_mask"][0, out.prompt_length + len(answer) :].sum() == 0
    assert verify(samples(1)[0], out.texts[0]) in (0.0, 1.0)


def test_truncated_thinking_gets_a_forced_answer_masked_cue(policy: tuple[Any, Any]) -> None:
    _, processor = policy
    eos = processor.tokenizer.eos_token_id
    think = ids(processor, "<think>\nI count the shapes")[:5]
    cue = ids(processor, DEFAULT_ANSWER_CUE)
    script = lambda k, x: [think] if k == 0 else [[*ids(processor, "2"), eos]]
    engine, fake = _script_engine(processor, script, max_new_tokens=5, thinking=True, answer_tokens=4)
    out = engine.generate(samples(1), 1)
    assert len(fake.calls) == 2 and fake.calls[1]["max_new_tokens"] == 4
    second = fake.calls[1]["input_ids"][0].tolist()
    assert second[-len(cue) - 5 :] == think + cue  # the cue was appended to the truncated thinking
    assert out.truncated.tolist() == [True]
    mask = out.completion_mask[0].tolist()
    assert mask == [True] * 5 + [False] * len(cue) + [True, True]  # cue masked, answer + EOS trained
    assert out.texts[0].endswith("</think>\n\n2")
    sample = {**samples(1)[0], "answer": 2}
    assert verify(sample, out.texts[0]) == 1.0
    no_force, fake2 = _script_engine(processor, script, max_new_tokens=5, thinking=True, force_answer=False)
    assert no_force.generate(samples(1), 1).completion_mask.shape[1] == 5 and len(fake2.calls) == 1


def test_sampling_is_deterministic_under_a_seed_and_greedy_ignores_it(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    engine = HFRolloutEngine(model, processor, max_new_tokens=6, thinking=False, temperature=1.0)
    batch = samples(2)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(engine.generate(batch, 3).sequences)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(3)
    greedy_a = engine.generate(batch, 2, greedy=True).sequences
    torch.manual_seed(4)
    greedy_b = engine.generate(batch, 2, greedy=True).sequences
    assert torch.equal(greedy_a, greedy_b) and torch.equal(greedy_a[0], greedy_a[1])


def test_vision_encoder_once_per_batch_and_kv_cache(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    vision_calls: list[int] = []
    step_lengths: list[int] = []
    h1 = model.model.visual.register_forward_hook(lambda m, a, o: vision_calls.append(1))
    h2 = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: step_lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        engine = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False, batch_size=16)
        torch.manual_seed(0)
        out = engine.generate(samples(3), 2)
        assert len(vision_calls) == 1  # six rows, one generate call, one encoder pass
        assert step_lengths[0] == out.prompt_length and set(step_lengths[1:]) <= {1}  # cached decoding
        vision_calls.clear()
        HFRolloutEngine(model, processor, max_new_tokens=2, thinking=False, batch_size=4).generate(samples(3), 2)
        assert len(vision_calls) == 2  # ceil(6 / 4) batches
    finally:
        h1.remove()
        h2.remove()
    _, processor = policy
    engine, fake = _script_engine(processor, lambda k, x: [[5]] * x.shape[0], max_new_tokens=2)
    engine.generate(samples(1), 2)
    assert fake.calls[0]["use_cache"] is True and "pixel_values" in fake.calls[0]


def test_logprobs_match_a_full_forward_and_survive_row_selection(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    torch.manual_seed(0)
    out = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False).generate(
        samples(3, tasks=("count", "compare")), 2
    )
    with torch.no_grad():
        lp, entropy = rollout_logprobs(
            model, out.sequences, out.model_inputs, out.prompt_length, temperature=0.7, with_entropy=True
        )
        logits = model(input_ids=out.sequences, **out.model_inputs).logits.float() / 0.7
        ref = torch.log_softmax(logits, -1)[:, out.prompt_length - 1 : -1]
        expected = ref.gather(-1, out.sequences[:, out.prompt_length :, None]).squeeze(-1)
        torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-4)
        assert entropy is not None
        torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1), rtol=1e-4, atol=1e-4)
        chunked, _ = rollout_logprobs(
            model, out.sequences, out.model_inputs, out.prompt_length, temperature=0.7, chunk_size=5
        )
        torch.testing.assert_close(chunked, lp)
        seqs, mask, inputs = select_rows(out, [5, 1])
        sub, _ = rollout_logprobs(model, seqs, inputs, out.prompt_length)
        full, _ = rollout_logprobs(model, out.sequences, out.model_inputs, out.prompt_length)
        keep = mask
        torch.testing.assert_close(sub[keep], full[[5, 1]][keep], rtol=1e-4, atol=1e-4)
        # regrouping (filtering, dynamic sampling) keeps every row's log-probs
        joined = concat_rollouts([subset_groups(out, [2]), subset_groups(out, [0])], processor.tokenizer.pad_token_id)
        again, _ = rollout_logprobs(model, joined.sequences, joined.model_inputs, joined.prompt_length)
        rows = [4, 5, 0, 1]
        width = out.completion_mask.shape[1]
        torch.testing.assert_close(
            again[:, :width][joined.completion_mask[:, :width]], full[rows][out.completion_mask[rows]]
        )
        assert joined.texts == [out.texts[r] for r in rows]


def test_video_prompts_roll_out_with_their_frames_and_score_like_a_full_forward(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    mixed = samples(4, tasks=("video_move", "count", "video_appear"), seed=3)
    assert any(item["type"] == "video" for s in mixed for m in s["messages"] for item in m["content"])
    torch.manual_seed(0)
    out = HFRolloutEngine(model, processor, max_new_tokens=3, thinking=False).generate(mixed, 2)
    grids = out.model_inputs["video_grid_thw"]
    videos = [sum(item["type"] == "video" for m in s["messages"] for item in m["content"]) for s in mixed]
    assert out.videos_per_row == [v for v in videos for _ in range(2)] and grids.shape[0] == sum(out.videos_per_row)
    assert out.model_inputs["pixel_values_videos"].shape[0] == int(grids.prod(-1).sum())
    placeholders = int((out.sequences[:, : out.prompt_length] == model.config.video_token_id).sum())
    assert placeholders == int(grids.prod(-1).sum()) // 4
    with torch.no_grad():
        lp, _ = rollout_logprobs(model, out.sequences, out.model_inputs, out.prompt_length)
        logits = model(input_ids=out.sequences, **out.model_inputs).logits.float()
        ref = torch.log_softmax(logits, -1)[:, out.prompt_length - 1 : -1]
        expected = ref.gather(-1, out.sequences[:, out.prompt_length :, None]).squeeze(-1)
        torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-4)
        rows = [7, 0, 2]  # video and image rows, out of order: each keeps its own frames
        seqs, mask, inputs = select_rows(out, rows)
        sub, _ = rollout_logprobs(model, seqs, inputs, out.prompt_length)
        torch.testing.assert_close(sub[mask], lp[rows][mask], rtol=1e-4, atol=1e-4)


def test_bad_input(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    engine = HFRolloutEngine(model, processor, max_new_tokens=2)
    with pytest.raises(ValueError, match="group_size"):
        engine.generate(samples(1), 0)
    with pytest.raises(ValueError, match="at least one sample"):
        engine.generate([], 2)
    with pytest.raises(ValueError, match="no user turn"):
        engine.generate([{"id": "x", "messages": [{"role": "assistant", "content": "hi"}]}], 1)
    audio = {"id": "a", "messages": [{"role": "user", "content": [{"type": "audio", "audio": []}]}]}
    with pytest.raises(ValueError, match="message 0 item 0: expected an image, video or text item"):
        engine.generate([audio], 1)
    with pytest.raises(ValueError, match="holds a video: prompt_text returns text and images only"):
        prompt_text(processor, samples(1, tasks=("video_move",))[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFRolloutEngine(model, processor, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        HFRolloutEngine(model, processor, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        rollout_logprobs(model, torch.zeros(1, 2, dtype=torch.long), {}, 1, chunk_size=0)
    with pytest.raises(ValueError, match="one group size"):
        concat_rollouts([], 0)


def test_chunked_logprob_gradients_match_the_naive_formula(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    torch.manual_seed(1)
    out = HFRolloutEngine(model, processor, max_new_tokens=3, thinking=False).generate(samples(1), 2)
    weight = torch.randn(out.completion_mask.shape)
    grads = []
    for chunk in (2, None):
        model.zero_grad()
        if chunk is None:  # naive: full logits, log_softmax, gather
            logits = model(input_ids=out.sequences, **out.model_inputs).logits.float() / 0.9
            logp = torch.log_softmax(logits, -1)[:, out.prompt_length - 1 : -1]
            lp = logp.gather(-1, out.sequences[:, out.prompt_length :, None]).squeeze(-1)
        else:
            lp, _ = rollout_logprobs(
                model, out.sequences, out.model_inputs, out.prompt_length, temperature=0.9, chunk_size=chunk
            )
        (lp * weight).sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
