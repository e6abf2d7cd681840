"""Inverse frequencies and attention factors: bit-equal to transformers, close to float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vl_rope import RopeScaling, default_inv_freq, rope_frequencies

CASES = [
    ("default", {}),
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 2.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 2048}),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 2048, "mscale": 0.707, "mscale_all_dim": 1.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 2048, "truncate": False}),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 1.5}),
]


def _hf(rope_type: str, params: dict, head_dim: int, theta: float, seq_len: int | None = None):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params},
    )
    if rope_type == "default":
        base = theta
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize(("rope_type", "params"), CASES)
@pytest.mark.parametrize(("head_dim", "theta"), [(128, 5e6), (64, 10000.0), (96, 1e6)])
def test_bit_equal_to_transformers(rope_type: str, params: dict, head_dim: int, theta: float) -> None:
    ref_inv, ref_factor = _hf(rope_type, params, head_dim, theta)
    scaling = RopeScaling.from_hf({"rope_type": rope_type, **params}, max_position_embeddings=8192)
    inv, factor = rope_frequencies(head_dim, theta, scaling)
    assert torch.equal(inv, ref_inv.float())
    assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("seq_len", [100, 8192, 20000, 65537])
def test_dynamic_grows_like_transformers(seq_len: int) -> None:
    ref_inv, _ = _hf("dynamic", {"factor": 2.0}, 64, 10000.0, seq_len=seq_len)
    scaling = RopeScaling(rope_type="dynamic", factor=2.0, max_position_embeddings=8192)
    inv, _ = rope_frequencies(64, 10000.0, scaling, seq_len=seq_len)
    assert torch.equal(inv, ref_inv)


def _yarn_f64(dim: int, theta: float, factor: float, original: int, fast: float = 32, slow: float = 1) -> torch.Tensor:
    """YaRN (arXiv 2309.00071, eq. 17-20) written from the paper in float64."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    inv = theta ** (-2 * i / dim)
    low = math.floor(dim * math.log(original / (fast * 2 * math.pi)) / (2 * math.log(theta)))
    high = math.ceil(dim * math.log(original / (slow * 2 * math.pi)) / (2 * math.log(theta)))
    ramp = ((i - max(low, 0)) / (min(high, dim - 1) - max(low, 0))).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp)


def test_close_to_float64_formulas() -> None:
    i = torch.arange(64, dtype=torch.float64)
    exact = 5e6 ** (-2 * i / 128)
    torch.testing.assert_close(default_inv_freq(128, 5e6).double(), exact, rtol=1e-6, atol=0)
    lin, _ = rope_frequencies(128, 5e6, RopeScaling(rope_type="linear", factor=4.0))
    torch.testing.assert_close(lin.double(), exact / 4, rtol=1e-6, atol=0)
    scaling = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    yarn, attn = rope_frequencies(128, 5e6, scaling)
    torch.testing.assert_close(yarn.double(), _yarn_f64(128, 5e6, 4.0, 262144), rtol=1e-6, atol=0)
    assert attn == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # dynamic: unchanged within the trained length, base grows beyond it
    dyn = RopeScaling(rope_type="dynamic", factor=2.0, max_position_embeddings=4096)
    assert torch.equal(rope_frequencies(64, 1e4, dyn, seq_len=4096)[0], default_inv_freq(64, 1e4))
    grown = 1e4 * (2.0 * 8192 / 4096 - 1) ** (64 / 62)
    torch.testing.assert_close(
        rope_frequencies(64, 1e4, dyn, seq_len=8192)[0].double(),
        default_inv_freq(64, grown).double(),
        rtol=1e-6,
        atol=0,
    )


def test_yarn_factor_from_lengths() -> None:
    a = rope_frequencies(
        64, 1e4, RopeScaling(rope_type="yarn", original_max_position_embeddings=2048, max_position_embeddings=8192)
    )
    b = rope_frequencies(64, 1e4, RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rope_type": "ntk"}, "unknown rope_type 'ntk'"),
        ({"rope_type": "linear"}, "needs `factor`"),
        ({"rope_type": "dynamic", "factor": 2.0}, "needs `max_position_embeddings`"),
        ({"rope_type": "yarn", "factor": 2.0}, "needs `original_max_position_embeddings`"),
        ({"rope_type": "linear", "factor": -1.0}, "must be positive"),
    ],
)
def test_bad_scaling(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RopeScaling(**kwargs)


def test_from_hf_rejects_unknown_keys_and_reads_legacy_type() -> None:
    with pytest.raises(ValueError, match=r"unknown rope scaling keys \['factr'\]"):
        RopeScaling.from_hf({"rope_type": "linear", "factr": 2.0})
    legacy = RopeScaling.from_hf({"type": "linear", "factor": 2.0, "rope_theta": 1e6, "mrope_section": [1, 1, 1]})
    assert legacy.rope_type == "linear" and legacy.factor == 2.0
    assert RopeScaling.from_hf(None).rope_type == "default"
    assert legacy.to_dict()["factor"] == 2.0


@pytest.mark.parametrize("dim", [0, 7, -2])
def test_bad_dim(dim: int) -> None:
    with pytest.raises(ValueError, match="positive even"):
        default_inv_freq(dim, 1e4)
