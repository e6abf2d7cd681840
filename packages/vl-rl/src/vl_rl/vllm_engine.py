"""A :class:`~vl_rl.rollout.RolloutEngine` over vLLM (optional extra: ``pip install vl-rl[vllm]``).

vLLM samples the responses (paged attention, continuous batching); the :class:`~vl_rl.rollout.Rollout`
it returns is built with our processor exactly as :class:`~vl_rl.rollout.HFRolloutEngine` builds it
(the prompt re-encoded with the same chat template, so the trainer's forward sees the same tokens and
pixels). Each sample becomes one request ``{"prompt": text, "multi_modal_data": {"image": [...]}}``
with ``SamplingParams(n=G, ...)``; greedy decoding uses ``temperature=0`` and ``n=1`` per copy.

The policy's weights change every step: :class:`~vl_rl.trainer.RLTrainer` calls
:meth:`VLLMRolloutEngine.sync_weights` after every update. It hands ``(name, tensor)`` pairs in the official
checkpoint layout (:func:`vl_rl.weight_sync.official_weights`: the names and shapes vLLM's Qwen3-VL
``load_weights`` reads from Hub files) to ``weight_loader``, by default the in-process vLLM model's
``load_weights``. Forced answers after truncation are not applied by this engine, and prompts with videos
are refused (:func:`~vl_rl.rollout.prompt_text`).

Tested on CPU with a stand-in ``LLM`` (the same calls and tensors); running a real vLLM engine (its
sampling, its ``load_weights`` and the path to its in-process model, which changes between vLLM
versions) needs a GPU and is not covered by the CPU tests.

Notation: ``N`` prompts, ``G`` responses per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .rollout import HFRolloutEngine, Rollout, encode_prompt, prompt_text
from .weight_sync import official_weights

__all__ = ["VLLMRolloutEngine", "require_vllm"]

_INSTALL = "vLLM is not installed: pip install vl-rl[vllm] (or pip install vllm) to use VLLMRolloutEngine"


def require_vllm() -> Any:
    """The ``vllm`` module.

    Raises:
        ImportError: vLLM is missing (the message names ``pip install vl-rl[vllm]``).
    """
    try:
        import vllm  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return vllm


WeightLoader = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]


class VLLMRolloutEngine(HFRolloutEngine):
    """Rollouts sampled by a ``vllm.LLM`` (see the module docstring).

    Args:
        llm: A ``vllm.LLM``, or a model folder to build one from (``vllm.LLM(llm, **llm_kwargs)``).
        processor: Our processor (chat template, tokenizer, image processor) of the same model.
        max_new_tokens: Tokens per response.
        temperature: Sampling temperature.
        top_p: Nucleus threshold.
        thinking: Thinking prompt on / off / per sample.
        sampling_params: The ``SamplingParams`` class (default ``vllm.SamplingParams``; tests pass a fake).
        weight_loader: Called with ``(name, tensor)`` pairs by :meth:`sync_weights`.
        **llm_kwargs: Passed to ``vllm.LLM`` when ``llm`` is a path.

    Raises:
        ImportError: vLLM is needed (a path given, or no ``sampling_params``) but not installed.
    """

    def __init__(
        self,
        llm: Any,
        processor: Any,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        thinking: bool | None = None,
        sampling_params: Any = None,
        weight_loader: WeightLoader | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if isinstance(llm, str) or sampling_params is None:
            vllm = require_vllm()
            llm = vllm.LLM(llm, **llm_kwargs) if isinstance(llm, str) else llm
            sampling_params = sampling_params or vllm.SamplingParams
        self.llm, self.sampling_params, self.weight_loader = llm, sampling_params, weight_loader
        super().__init__(
            torch.nn.Linear(1, 1),  # placeholder: generation happens in vLLM, never in this module
            processor,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            thinking=thinking,
            force_answer=False,
        )

    def requests(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One vLLM request per sample: the rendered prompt and its images."""
        out = []
        for sample in samples:
            text, images = prompt_text(self.processor, sample, self.thinking)
            request: dict[str, Any] = {"prompt": text}
            if images:
                request["multi_modal_data"] = {"image": images}
            out.append(request)
        return out

    def params(self, group_size: int, greedy: bool) -> Any:
        """The ``SamplingParams`` of one call."""
        if greedy:
            return self.sampling_params(n=group_size, temperature=0.0, max_tokens=self.max_new_tokens)
        return self.sampling_params(
            n=group_size, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens
        )

    def generate(self, samples: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        """``group_size`` responses per sample from vLLM, as a :class:`~vl_rl.rollout.Rollout`.

        Raises:
            ValueError: No samples, ``group_size < 1``, or vLLM returned the wrong number of outputs.
        """
        if not samples or group_size < 1:
            raise ValueError(f"need at least one sample and group_size >= 1, got {len(samples)} and {group_size}")
        outputs = self.llm.generate(self.requests(samples), self.params(group_size, greedy), use_tqdm=False)
        if len(outputs) != len(samples):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(samples)} requests")
        rows, completions, trained, truncated = [], [], [], []
        for sample, output in zip(samples, outputs, strict=True):
            if len(output.outputs) != group_size:
                raise ValueError(f"vLLM returned {len(output.outputs)} completions, expected {group_size}")
            encoded = encode_prompt(self.processor, sample, self.thinking)
            for completion in output.outputs:
                kept, no_eos = self._cut(list(completion.token_ids))
                rows.append(encoded)
                completions.append(kept)
                trained.append([True] * len(kept))
                truncated.append(no_eos and getattr(completion, "finish_reason", "length") == "length")
        return self.assemble(list(samples), group_size, rows, completions, trained, truncated)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into vLLM in the official layout (after every policy update).

        Raises:
            RuntimeError: No ``weight_loader`` was given and the vLLM model cannot be reached in-process.
        """
        loader = self.weight_loader
        if loader is None:
            try:
                runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
                loader = runner.model.load_weights
            except AttributeError as exc:
                raise RuntimeError(
                    "cannot reach the vLLM model in this process; pass weight_loader=... to VLLMRolloutEngine"
                ) from exc
        loader(official_weights(model))
