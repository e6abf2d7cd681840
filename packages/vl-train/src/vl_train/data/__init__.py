"""Multimodal training data: the sample format, rendering, packing, mixtures and the synthetic dataset.

- ``validate_sample``, ``JsonlDataset``, ``HFDataset``, ``write_jsonl``: the suite's sample format
  (chat messages with image/video entries) on disk and from Hugging Face ``datasets``.
- ``SampleRenderer``: chat template -> token ids with labels on assistant tokens only (thinking or not).
- ``pack`` / ``iter_packed`` / ``first_fit``: samples packed into fixed-length rows with ``segment_ids``.
- ``collate``: pad-to-longest batches with the same keys.
- ``MixtureSampler``: per-source ratios, deterministic shuffling, resumable state, streaming.
- ``SyntheticDataset``, ``verify``: the embedded, procedurally generated dataset with verifiable answers.
- ``DataStats``, ``DataError``: what was skipped, dropped or truncated, and why.
"""

from .collate import collate
from .format import DataError, DataStats, HFDataset, JsonlDataset, validate_sample, write_jsonl
from .mixture import MixtureSampler, ShuffleState
from .packing import first_fit, iter_packed, pack
from .render import RenderedSample, SampleRenderer
from .synthetic import TASK_NAMES, SyntheticDataset, verify

__all__ = [
    "TASK_NAMES",
    "DataError",
    "DataStats",
    "HFDataset",
    "JsonlDataset",
    "MixtureSampler",
    "RenderedSample",
    "SampleRenderer",
    "ShuffleState",
    "SyntheticDataset",
    "collate",
    "first_fit",
    "iter_packed",
    "pack",
    "validate_sample",
    "verify",
    "write_jsonl",
]
