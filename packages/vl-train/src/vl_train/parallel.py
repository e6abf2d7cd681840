"""FSDP2 sharding and activation checkpointing applied to a single-device VLM, plus torchrun helpers.

The model code of vl-model is written for one device (ARCHITECTURE.md); data parallelism is applied
here by functions, as in torchtitan's ``parallelize.py``: :func:`parallelize` calls PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``, ZeRO-3 style per-parameter sharding over a 1-D device mesh)
on every transformer block, then on the root, and :func:`checkpoint_blocks` recomputes each block's
activations in backward (``torch.utils.checkpoint``, non-reentrant), which the long-context stages
(S3, SFT at 256K; REFERENCE.md section 4) need.

FSDP units (asked from the model, :class:`vl_model.TrainableVLM`; :func:`shard_units` lists them):

- each decoder layer (``model.decoder_layers()``), for the core model and composed ones alike;
- each tower block (``model.vision_tower().blocks``);
- the merge head ``merger`` and the DeepStack mergers ``deepstack_merger_list`` of the tower;
- the root: everything else (token embedding, final norm, output head, patch / position
  embeddings). A tied output head and token embedding are one parameter, so they must live in one
  unit: the root holds both.

The loss uses ``model.output_weight()`` outside the head's forward (``lm_loss`` projects only
labelled positions, in chunks), and trainers call ``model.forward_hidden(...)`` rather than
``model(...)``. FSDP2 only all-gathers a unit's parameters inside that module's forward, so run the
whole step computation (hidden states and loss) through :func:`root_forward`: it runs a function as a
forward of the root (``torch.distributed.fsdp.register_fsdp_forward_method``), so the root's
parameters are gathered for it and their gradients reduce-scattered in backward. Without FSDP it just
calls the function.

Mixed modalities: every tower block's forward and backward is a collective, so ranks must run the
tower equally often whatever their micro-batches hold (text only, images, videos, both). ``parallelize``
turns on the model's ``uniform_vision_pass``: images and videos are encoded in one tower pass, and a
forward without pixels runs a zero-weighted placeholder image (the loss and gradients are unchanged).

FSDP2 averages gradients over ranks: with a global loss normaliser (``vl_train.losses``) multiply each
rank's loss by :func:`world_size` before ``backward``.

Notation: ``W`` world size (ranks), ``r`` this rank, "unit" a module passed to ``fully_shard``: its
parameters are gathered and freed together.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "barrier",
    "checkpoint_blocks",
    "context_parallel_mesh",
    "full_state_dict",
    "init_distributed",
    "is_main_process",
    "parallelize",
    "rank",
    "root_forward",
    "run_launched",
    "shard_units",
    "sum_over_ranks",
    "training_device",
    "world_size",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

_MERGER_NAMES = ("merger", "deepstack_merger_list")
_ROOT_CALL = "_vl_train_root_call"
_CHECKPOINTED = "_vl_train_checkpointed"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> bool:
    """Join the process group described by torchrun's environment; a no-op for a single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``env://``).
    The backend defaults to ``nccl`` when CUDA is available (each rank then uses GPU ``LOCAL_RANK``)
    and ``gloo`` otherwise.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose as above).
        timeout_s: Collective timeout.

    Returns:
        True when a process group with more than one rank is (now) initialised, False when
        ``WORLD_SIZE`` is absent or 1.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable, or ``WORLD_SIZE > 1`` without ``RANK``,
            ``MASTER_ADDR`` or ``MASTER_PORT``.
    """
    if _dist_ready():
        return torch.distributed.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not torch.distributed.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return True


def run_launched(prog: str, run: Callable[[], int]) -> int:
    """A command line's ``run()`` inside the process group torchrun describes (one process: just ``run()``).

    Joins the group first (:func:`init_distributed`) and destroys it afterwards, also when ``run`` raises.

    Returns:
        ``run()``'s exit status, or 2 when the group cannot be joined (the reason printed as ``prog: error: ...``).
    """
    try:
        distributed = init_distributed()
    except RuntimeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over all ranks, in place (unchanged on one process); returns it."""
    if world_size() > 1:
        torch.distributed.all_reduce(value)
    return value


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return torch.distributed.get_world_size() if _dist_ready() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return torch.distributed.get_rank() if _dist_ready() else 0


def is_main_process() -> bool:
    """True on rank 0: the process that logs and writes files."""
    return rank() == 0


def training_device() -> torch.device:
    """Where this process trains: GPU ``LOCAL_RANK`` (torchrun's; 0 alone) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if _dist_ready():
        torch.distributed.barrier()


def _named(model: nn.Module, modules: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(names.get(id(m), type(m).__name__), m) for m in modules]


def _blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], nn.Module]:
    """``(decoder layers, tower blocks, tower)`` of a :class:`vl_model.TrainableVLM`, named."""
    layers_of = getattr(model, "decoder_layers", None)
    tower_of = getattr(model, "vision_tower", None)
    if not callable(layers_of) or not callable(tower_of):
        raise ValueError(
            f"{type(model).__name__} has no decoder_layers() / vision_tower(): parallelize takes the models of "
            "vl_model (VLForConditionalGeneration, ComposedVLForConditionalGeneration; see vl_model.runtime)"
        )
    layers, tower = list(layers_of()), tower_of()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers to shard")
    return _named(model, layers), _named(model, list(getattr(tower, "blocks", []))), tower


def shard_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The non-root FSDP units of ``model`` in forward order: tower blocks, merger parts, decoder layers.

    Raises:
        ValueError: The model is not a :class:`vl_model.TrainableVLM`.
    """
    decoder, vision, tower = _blocks(model)
    mergers = [
        part
        for name in _MERGER_NAMES
        if isinstance(part := getattr(tower, name, None), nn.Module) and any(True for _ in part.parameters())
    ]
    return vision + _named(model, mergers) + decoder


def _is_kv_cache(value: Any) -> bool:
    # duck-typed transformers ``Cache`` (no transformers import here)
    return callable(getattr(value, "get_seq_length", None)) and callable(getattr(value, "update", None))


def _checkpointed_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if any(_is_kv_cache(a) for a in (*args, *kwargs.values())):
            # the recompute in backward would append this step's keys to the cache a second time
            raise ValueError(
                "a checkpointed block got a KV cache: pass use_cache=False to the model when training "
                "with activation checkpointing"
            )
        # Non-reentrant: keyword arguments, inputs without grad and FSDP2's hooks all work with it.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Recompute every decoder layer's and tower block's activations in backward instead of storing them.

    Replaces each block's ``forward`` on the instance (the class and the parameter names stay as
    they are, so state dicts, optimiser groups and ``vl_model.parts`` are unaffected). Idempotent.
    Apply before :func:`parallelize`'s sharding (it calls this itself when asked); the recompute runs
    inside the block's FSDP unit, whose parameters are gathered again for backward.

    Returns:
        The names of the blocks now checkpointed.

    Raises:
        ValueError: Unknown layout (see :func:`shard_units`).
    """
    decoder, vision, _ = _blocks(model)
    blocks = decoder + vision
    for _, block in blocks:
        if not getattr(block, _CHECKPOINTED, False):
            block.forward = _checkpointed_forward(block.forward)
            setattr(block, _CHECKPOINTED, True)
    return [name for name, _ in blocks]


def _default_mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if not _dist_ready():
        raise RuntimeError(
            "parallelize needs an initialised process group (call init_distributed() under torchrun) or a mesh"
        )
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (torch.distributed.get_world_size(),))


def context_parallel_mesh(context_parallel: int) -> Any:
    """The 2-D ``DeviceMesh`` ``("dp", "cp") = (W / C, C)`` of every rank; CP groups are consecutive ranks.

    Raises:
        RuntimeError: No process group.
        ValueError: ``C`` does not divide the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not _dist_ready():
        raise RuntimeError("context parallelism needs an initialised process group (init_distributed under torchrun)")
    world = torch.distributed.get_world_size()
    if context_parallel < 1 or world % context_parallel:
        raise ValueError(f"context_parallel = {context_parallel} must divide the {world} ranks")
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (world // context_parallel, context_parallel), mesh_dim_names=("dp", "cp"))


def parallelize(
    model: nn.Module,
    *,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    mixed_precision: Any = None,
    context_parallel: int = 1,
    expert_parallel: int = 1,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each block, the merger parts, then the root.

    Args:
        model: A :class:`vl_model.TrainableVLM` (core or composed) on the rank's device, initialised
            identically on every rank (same seed or loaded weights); FSDP keeps this rank's shard.
        mesh: A 1-D ``DeviceMesh`` (2-D for HSDP); default: every rank of the process group.
        reshard_after_forward: Free each block's gathered parameters after its forward (gather again
            in backward). The root always keeps its own until backward (FSDP2's root heuristic).
        activation_checkpointing: Also apply :func:`checkpoint_blocks`.
        mixed_precision: A ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters,
            fp32 gradient reduction) or None (compute in the parameters' dtype).
        context_parallel: ``C > 1``: split every row's sequence over groups of ``C`` consecutive ranks
            (:mod:`vl_train.context_parallel`) on the 2-D mesh of :func:`context_parallel_mesh`; FSDP2 then
            shards over the flattened ``dp x cp`` mesh. Give no ``mesh`` with it.
        expert_parallel: ``P > 1``: the experts of every ``vl_moe.SparseMoeBlock`` are sharded over the
            ``P`` ranks of the FSDP mesh and reached by all-to-all (:func:`vl_moe.shard_experts`); FSDP2
            shards the rest. ``P`` must equal the FSDP mesh's size (every rank one EP rank).

    Returns:
        The same module, now an ``FSDPModule``; run each training step's forward and loss through
        :func:`root_forward`.

    Raises:
        ValueError: Unknown layout (see :func:`shard_units`).
        RuntimeError: No process group and no mesh.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    units = shard_units(model)
    if context_parallel > 1:
        from .context_parallel import apply_context_parallel

        if mesh is not None:
            raise ValueError("parallelize: give a mesh or context_parallel > 1, not both")
        grid = context_parallel_mesh(context_parallel)
        apply_context_parallel(model, grid["cp"].get_group())
        mesh = grid._flatten("dp_cp")  # FSDP over every rank: CP ranks' gradients add up like data-parallel ones
    if mesh is None:
        mesh = _default_mesh()
    _uniform_vision_pass(model)
    experts = _expert_parallel(model, mesh, expert_parallel)
    if activation_checkpointing:
        checkpoint_blocks(model)
    policy = mixed_precision if mixed_precision is not None else MixedPrecisionPolicy()
    for _, unit in units:
        fully_shard(
            unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy, ignored_params=experts
        )
    # reshard_after_forward=None: FSDP2 keeps the root's parameters (embeddings, lm_head) gathered
    # from forward to backward, since backward needs them first.
    fully_shard(model, mesh=mesh, reshard_after_forward=None, mp_policy=policy, ignored_params=experts)
    setattr(model, _ROOT_CALL, _call)
    register_fsdp_forward_method(model, _ROOT_CALL)
    return model


def _expert_parallel(model: nn.Module, mesh: Any, size: int) -> set[nn.Parameter]:
    """Shard the MoE experts over ``mesh`` (``size`` ranks); their parameters, which FSDP must leave alone."""
    if size <= 1:
        return set()
    from vl_moe import ExpertParallelExperts, shard_experts

    if mesh.ndim != 1 or mesh.size() != size:
        raise ValueError(
            f"expert_parallel = {size} must equal the number of ranks FSDP shards over ({mesh.size()}): "
            "each rank is one expert-parallel rank"
        )
    if not shard_experts(model, mesh, gradient_divide_factor=float(size)):
        raise ValueError(f"expert_parallel = {size} but {type(model).__name__} has no vl_moe.SparseMoeBlock")
    return {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def _uniform_vision_pass(model: nn.Module) -> None:
    """Make every fresh forward run the sharded tower once, whatever modalities the rank's batch holds.

    Each tower block is an FSDP unit: its forward and backward are collectives, so ranks holding
    text-only, image and video micro-batches must still run the tower the same number of times. The
    models of vl_model then encode images and videos in one pass and, without pixels, a zero-weighted
    placeholder image (``uniform_vision_pass``; the loss and gradients are those without it).
    """
    if hasattr(model, "uniform_vision_pass"):
        model.uniform_vision_pass = True  # type: ignore[assignment]
    else:
        log.warning(
            "%s has no uniform_vision_pass switch: every rank's batches must hold the same visual modalities "
            "in every micro-step, or the sharded tower's collectives will not match (a hang on NCCL)",
            type(model).__name__,
        )


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


def root_forward(model: nn.Module, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as a forward of ``model``'s root FSDP unit.

    Inside, the root's parameters (the output head, embeddings, final norm) are the gathered
    full tensors, so ``lm_loss(hidden, model.output_weight(), ...)`` works, and their gradients are
    reduce-scattered after ``backward``. Tensors in ``args`` / ``kwargs`` are cast to the
    mixed-precision parameter dtype like forward inputs. ``fn`` must return its differentiable
    outputs as tensors, or in tuples, lists, dicts or dataclasses (``LossOutput``) of tensors.
    For a model not sharded by :func:`parallelize` this is ``fn(*args, **kwargs)``.

    Example:
        >>> model = torch.nn.Linear(2, 3)
        >>> root_forward(model, lambda x: model.weight @ x, torch.ones(2)).shape
        torch.Size([3])
    """
    method = getattr(model, _ROOT_CALL, None)
    if method is None:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            raise ValueError(f"{type(model).__name__} was sharded without vl_train.parallel.parallelize")
        return fn(*args, **kwargs)
    return method(fn, *args, **kwargs)


def full_state_dict(model: nn.Module, *, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict (plain tensors), gathered from every rank; a collective under FSDP.

    Every rank must call it (each receives the full tensors). Parameter names are the model's own.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = full.detach().cpu() if to_cpu else full.detach()
    return out
