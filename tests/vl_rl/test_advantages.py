"""group_advantages against a Python-float reference, and its bad inputs."""

from __future__ import annotations

import pytest
import torch
from _reference_losses import ref_group_advantages

from vl_rl.advantages import group_advantages


def _rewards(n: int, g: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n, g), generator=gen).double() + 0.1 * torch.rand(n, g, generator=gen, dtype=torch.float64)
    r[0] = 0.7  # one constant group
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(("n", "g"), [(3, 5), (4, 2), (1, 7)])
def test_matches_reference(scale: str, n: int, g: int) -> None:
    r = _rewards(n, g, seed=n * 10 + g)
    if n == 1:
        r[0, 0] = 1.5  # a lone group must vary for the batch std to exist
    got = group_advantages(r, scale)  # type: ignore[arg-type]
    want = torch.tensor(ref_group_advantages(r.tolist(), scale), dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = group_advantages(r.float(), scale)  # type: ignore[arg-type]
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_sample_std_is_used() -> None:
    # rewards (0, 1): mean 0.5, sample std sqrt(0.5) -> +-0.5 / 0.7071 = +-0.7071
    got = group_advantages(torch.tensor([[0.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(got, torch.tensor([[-(0.5**0.5), 0.5**0.5]]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_equal_rewards_give_exact_zeros(scale: str, eps: float) -> None:
    r = torch.tensor([[0.1, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3], [-7.3, -7.3, -7.3]])
    got = group_advantages(r, scale, eps)  # type: ignore[arg-type]
    assert torch.equal(got, torch.zeros_like(r))
    mixed = torch.cat([r, torch.tensor([[0.0, 1.0, 0.5]])])
    got = group_advantages(mixed, scale, eps)  # type: ignore[arg-type]
    assert torch.isfinite(got).all()
    assert torch.equal(got[:3], torch.zeros(3, 3))
    assert got[3].abs().sum() > 0


def test_flat_with_group_size() -> None:
    r = _rewards(4, 3, seed=1)
    for scale in ("group", "batch", "none"):
        flat = group_advantages(r.reshape(-1), scale, group_size=3)
        assert flat.shape == (12,)
        torch.testing.assert_close(flat, group_advantages(r, scale).reshape(-1))


def test_integer_and_bool_rewards() -> None:
    got = group_advantages(torch.tensor([[1, 0, 0, 1]]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(group_advantages(torch.tensor([[True, False, False, True]])), got)


def test_group_of_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.ones(4), group_size=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": torch.ones(2, 3, 4)}, r"\[N, G\]"),
        ({"rewards": torch.ones(6)}, "needs group_size"),
        ({"rewards": torch.ones(7), "group_size": 3}, "7 rewards"),
        ({"rewards": torch.ones(2, 3), "group_size": 4}, "group_size=4"),
        ({"rewards": torch.ones(2, 3), "scale": "std"}, "scale"),
        ({"rewards": torch.ones(2, 3), "eps": -1.0}, "eps"),
    ],
)
def test_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)  # type: ignore[arg-type]


def test_nan_rewards_name_the_count() -> None:
    r = torch.zeros(3, 4)
    r[1, 2] = float("nan")
    r[2, 0] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf"):
        group_advantages(r)
