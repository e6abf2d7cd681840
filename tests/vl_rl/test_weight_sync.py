"""The trainer -> vLLM weight sync, on CPU with a stand-in engine: the official layout's names, shapes and values.

vLLM's Qwen3-VL ``load_weights`` reads what the Hub checkpoints hold, so every synced pair must equal a tensor
of the official checkpoint that ``export_qwen3_vl`` writes (the names those transformers' own files have). A real
vLLM engine needs a GPU (``gpu`` marker, skipped without vLLM and CUDA).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _rl_helpers import ids
from _threads import one_thread
from safetensors.torch import load_file

from vl_model import export_qwen3_vl
from vl_model.testing import make_official_checkpoint
from vl_rl.config import RLConfig
from vl_rl.trainer import RLTrainer
from vl_rl.vllm_engine import VLLMRolloutEngine
from vl_rl.weight_sync import official_weights
from vl_train.builders import build_model


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_synced_pairs_are_the_official_checkpoint(tmp_path: Path, moe: bool) -> None:
    hub = make_official_checkpoint(tmp_path / "hub", moe=moe)
    model, _ = build_model({"init_from": str(hub)})
    pairs = dict(official_weights(model))
    exported = checkpoint_tensors(export_qwen3_vl(model, tmp_path / "export"))  # the official layout
    assert sorted(exported) == sorted(pairs)
    assert all(pairs[k].shape == exported[k].shape and torch.equal(pairs[k], exported[k]) for k in exported)
    # the names (and every dense tensor) are those of the checkpoint transformers itself wrote
    written = checkpoint_tensors(hub)
    assert sorted(written) == sorted(pairs)
    experts = [k for k in pairs if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert all(torch.equal(pairs[k], written[k]) for k in written if k not in experts)
    if moe:  # expert tensors go out transposed, as Hub files hold them (vLLM: is_fused_checkpoint_transposed)
        down = next(k for k in experts if k.endswith("down_proj"))
        memory = model.state_dict()[down]  # [E, H, I] in memory
        assert pairs[down].shape == (memory.shape[0], memory.shape[2], memory.shape[1])
        assert torch.equal(pairs[down], memory.transpose(1, 2))


@dataclass
class StandInLLM:
    """A ``vllm.LLM`` stand-in: scripted completions, and the in-process model's ``load_weights`` recording calls."""

    completions: list[list[int]]
    loads: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        model = SimpleNamespace(load_weights=self.load_weights)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.loads.append({name: tensor.clone() for name, tensor in weights})
        return set(self.loads[-1])

    def generate(self, requests: list[dict[str, Any]], params: Any, use_tqdm: bool = False) -> list[Any]:
        chosen = [self.completions[i % len(self.completions)] for i in range(params.n)]
        out = [SimpleNamespace(token_ids=list(c), finish_reason="stop") for c in chosen]
        return [SimpleNamespace(outputs=out) for _ in requests]


@dataclass
class Params:
    n: int
    temperature: float
    max_tokens: int
    top_p: float = 1.0


def test_trainer_syncs_the_updated_policy_into_the_engine(tmp_path: Path) -> None:
    hub = make_official_checkpoint(tmp_path / "hub", moe=True)  # MoE: the layout differs from memory
    model, processor = build_model({"init_from": str(hub)})
    eos = processor.tokenizer.eos_token_id
    llm = StandInLLM([[*ids(processor, "cat"), eos], [*ids(processor, "a grey cat"), eos]])
    engine = VLLMRolloutEngine(llm, processor, max_new_tokens=4, thinking=False, sampling_params=Params)
    prompt = {"id": "p", "messages": [{"role": "user", "content": "what is it"}], "answer": "cat"}
    config = RLConfig(
        group_size=2,
        prompts_per_step=1,
        mini_batches=1,
        max_new_tokens=4,
        max_steps=2,
        eval_every=0,
        thinking=False,
        trainable=("llm",),
        output_dir=str(tmp_path / "run"),
        progress=False,
        plot=False,
        optim={"lr": 1e-2},
    )
    before = {k: v.clone() for k, v in official_weights(model)}  # the pairs are views of the live weights
    RLTrainer(model, processor, config, [prompt], lambda s, r: float(r.strip() == "cat"), engine=engine).train()
    assert len(llm.loads) == 2  # once after every update
    last, now = llm.loads[-1], dict(official_weights(model))
    official = checkpoint_tensors(export_qwen3_vl(model, tmp_path / "export"))
    assert sorted(last) == sorted(official) and all(torch.equal(last[k], official[k]) for k in official)
    changed = [k for k in now if not torch.equal(before[k], now[k])]
    assert changed and all(k.startswith("model.language_model") or k == "lm_head.weight" for k in changed)


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vLLM and a CUDA GPU"
)
def test_real_vllm_engine_takes_the_synced_weights(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    import vllm  # type: ignore[import-not-found, unused-ignore]

    hub = make_official_checkpoint(tmp_path / "hub")
    model, processor = build_model({"init_from": str(hub)})
    llm = vllm.LLM(str(hub), enforce_eager=True, gpu_memory_utilization=0.2)
    engine = VLLMRolloutEngine(llm, processor, max_new_tokens=4, thinking=False)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    engine.sync_weights(model)
    prompt = {"id": "p", "messages": [{"role": "user", "content": "what is it"}]}
    rollout = engine.generate([prompt], 2)
    assert rollout.sequences.shape[0] == 2
