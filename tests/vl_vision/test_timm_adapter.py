"""``TimmVisionTower``: the patch layout round trip, merger/DeepStack wiring, errors, and real timm.

timm needs torchvision, which some machines cannot install, so the layout is checked here with
``FakeViT``: a small module with the parts of timm's ``VisionTransformer`` interface the adapter
uses (``patch_embed.patch_size``, ``embed_dim``, ``num_prefix_tokens``, ``blocks``, ``norm``,
``dynamic_img_size``, ``forward_intermediates(..., output_fmt="NLC", intermediates_only=True)``
dropping prefix tokens). The tests at the end run the real timm where it imports.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vl_vision.merger import PatchMerger
from vl_vision.processing._patchify import patchify_into
from vl_vision.timm_adapter import TimmVisionTower, create_timm_model

P, T, M, C = 4, 2, 2, 3


class FakePatchEmbed(nn.Module):
    """Conv patch embedding with timm's ``dynamic_img_size`` output layout ``[B, h, w, D]``."""

    def __init__(self, dim: int, identity: bool) -> None:
        super().__init__()
        self.patch_size = (P, P)
        self.proj = nn.Conv2d(C, dim, P, P)
        if identity:  # token = its patch's (C, P, P) pixels
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim).reshape(dim, C, P, P))
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class FakeBlock(nn.Module):
    """Attention over all tokens of a slice (prefix included) + a linear, so token order matters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        return x + torch.tanh(self.fc(x))


class FakeViT(nn.Module):
    """The slice of timm's ``VisionTransformer`` the adapter relies on (see the module docstring)."""

    dynamic_img_size = True

    def __init__(self, dim: int = 48, depth: int = 3, prefix: int = 2, identity: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_prefix_tokens, self.in_chans = dim, prefix, C
        self.patch_embed = FakePatchEmbed(dim, identity)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.pos = nn.Parameter(torch.randn(1, dim, 3, 3))  # resampled to each grid, like timm's
        self.blocks = nn.Sequential(*(nn.Identity() if identity else FakeBlock(dim) for _ in range(depth)))
        self.norm = nn.Identity() if identity else nn.LayerNorm(dim)
        self.identity = identity

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        if not self.identity:
            x = x + F.interpolate(self.pos, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
        return torch.cat((self.prefix.expand(b, -1, -1), x.reshape(b, h * w, d)), 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: list[int],
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor]:
        assert output_fmt == "NLC" and intermediates_only and not norm
        x, out = self.embed(x), []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in indices:  # block order, as timm
                out.append(x[:, self.num_prefix_tokens :])
        return out


def _clips(grid: list[list[int]], seed: int = 0) -> list[np.ndarray]:
    """Random uint8 frames ``[F, H, W, C]`` per grid row (one frame = a still image when ``t == 1``)."""
    rng = np.random.default_rng(seed)
    out = []
    for t, h, w in grid:
        frames = 1 if t == 1 else t * T
        out.append(rng.integers(0, 256, (frames, h * P, w * P, C), dtype=np.uint8))
    return out


def _rows(clips: list[np.ndarray], grid: list[list[int]]) -> torch.Tensor:
    """The processor's own patchify (identity normalisation): rows in merge-block order."""
    scale, bias = np.ones((C, 1, 1), np.float32), np.zeros((C, 1, 1), np.float32)
    parts = []
    for frames, (t, h, w) in zip(clips, grid, strict=True):
        rows = torch.empty(t * h * w, C * T * P * P)
        patchify_into(rows, frames, scale, bias, patch_size=P, temporal_patch_size=T, merge_size=M)
        parts.append(rows)
    return torch.cat(parts).double()


def _reference_tokens(model: nn.Module, clips: list[np.ndarray], grid: list[list[int]]) -> torch.Tensor:
    """Run ``model`` on each slice alone (mean of its ``T`` frames), reorder its tokens by explicit loops."""
    out = []
    for frames, (t, h, w) in zip(clips, grid, strict=True):
        pix = torch.from_numpy(frames).double().permute(0, 3, 1, 2)  # [F, C, H, W]
        slices = pix.expand(T, -1, -1, -1)[None] if t == 1 else pix.reshape(t, T, C, h * P, w * P)
        for s in slices.mean(1):
            tokens = model.forward_features(s[None])[0, model.num_prefix_tokens :]
            for br in range(h // M):
                for bc in range(w // M):
                    for r in range(M):
                        for c in range(M):
                            out.append(tokens[(br * M + r) * w + bc * M + c])
    return torch.stack(out)


GRID = [[1, 6, 10], [2, 2, 14], [1, 4, 4], [1, 6, 10], [2, 6, 10]]


def _tower(model: nn.Module, **kwargs: object) -> TimmVisionTower:
    torch.manual_seed(0)
    return TimmVisionTower(model, out_hidden_size=40, temporal_patch_size=T, **kwargs).double().eval()  # type: ignore[arg-type]


def test_identity_model_returns_patches_in_merge_block_order() -> None:
    tower = _tower(FakeViT(dim=C * P * P, identity=True))
    clips = _clips(GRID)
    rows = _rows(clips, GRID)
    with torch.no_grad():
        out = tower(rows, torch.tensor(GRID))
    # each row is [C, T, P, P]; the adapter averages the T frames and must hand token i row i's pixels
    want = rows.reshape(-1, C, T, P * P).mean(2).reshape(-1, C * P * P)
    torch.testing.assert_close(out.last_hidden_state, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.merged, tower.merger(want), rtol=0, atol=1e-12)


def test_first_frame_reduce() -> None:
    tower = _tower(FakeViT(dim=C * P * P, identity=True), temporal_reduce="first")
    grid = [[2, 2, 4]]
    rows = _rows(_clips(grid), grid)
    with torch.no_grad():
        got = tower(rows, torch.tensor(grid)).last_hidden_state
    torch.testing.assert_close(got, rows.reshape(-1, C, T, P * P)[:, :, 0].reshape(-1, C * P * P), rtol=0, atol=0)


def test_matches_hand_reference_with_token_mixing() -> None:
    trunk = FakeViT().double()
    tower = _tower(trunk, deepstack_visual_indexes=[0, -2])
    assert tower.deepstack_merger_list.layer_indexes == [0, 1]
    clips = _clips(GRID, seed=1)
    rows, grid = _rows(clips, GRID), torch.tensor(GRID)
    with torch.no_grad():
        out = tower(rows, grid)
        want = _reference_tokens(trunk, clips, GRID)
        feats = tower.forward_intermediates(rows, grid, indices=[1, 0, -1])
    n = int(grid.prod(-1).sum())
    assert out.last_hidden_state.shape == (n, 48) and out.merged.shape == (n // 4, 40)
    torch.testing.assert_close(out.last_hidden_state, want, rtol=0, atol=1e-12)
    assert isinstance(tower.merger, PatchMerger)
    torch.testing.assert_close(out.merged, tower.merger(want), rtol=0, atol=1e-12)
    # the last raw block output, normed, is last_hidden_state; taps feed the DeepStack mergers
    torch.testing.assert_close(trunk.norm(feats[2]), want, rtol=0, atol=1e-12)
    assert len(out.deepstack) == 2
    for got, tap, merger in zip(out.deepstack, (feats[1], feats[0]), tower.deepstack_merger_list, strict=True):
        torch.testing.assert_close(got, merger(tap), rtol=0, atol=1e-12)


def test_batching_is_per_slice() -> None:
    tower = _tower(FakeViT().double())
    clips = _clips(GRID, seed=2)
    rows, grid = _rows(clips, GRID), torch.tensor(GRID)
    with torch.no_grad():
        together = tower(rows, grid).merged
        alone = [tower(r, g[None]).merged for r, g in zip(rows.split(grid.prod(-1).tolist()), grid, strict=True)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-12)


def test_forward_intermediates_indices() -> None:
    tower = _tower(FakeViT().double())
    rows, grid = _rows(_clips(GRID[:2]), GRID[:2]), torch.tensor(GRID[:2])
    with torch.no_grad():
        every = tower.forward_intermediates(rows, grid)
        last2 = tower.forward_intermediates(rows, grid, indices=2)
    assert len(every) == 3 and len(last2) == 2
    torch.testing.assert_close(last2[1], every[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the 3 blocks"):
        tower.forward_intermediates(rows, grid, indices=[3])


def test_errors() -> None:
    with pytest.raises(ValueError, match="patch_size = 8 but the timm model"):
        TimmVisionTower(FakeViT(), out_hidden_size=8, patch_size=8)
    static = FakeViT()
    static.dynamic_img_size = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        TimmVisionTower(static, out_hidden_size=8)
    with pytest.raises(ValueError, match="outside the 3 blocks"):
        TimmVisionTower(FakeViT(), out_hidden_size=8, deepstack_visual_indexes=[3])
    with pytest.raises(ValueError, match="expected a timm VisionTransformer"):
        TimmVisionTower(nn.Linear(2, 2), out_hidden_size=8)
    tower = TimmVisionTower(FakeViT(), out_hidden_size=8)
    with pytest.raises(ValueError, match="C\\*T\\*P\\*P"):
        tower(torch.zeros(4, 10), torch.tensor([[1, 2, 2]]))


def test_missing_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes ``import timm`` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'vl-vision\[timm\]'.*torchvision"):
        TimmVisionTower("vit_tiny_patch16_224", out_hidden_size=8)
    with pytest.raises(ImportError, match="needs timm"):
        create_timm_model("vit_tiny_patch16_224")


# ---------------------------------------------------------------- with the real timm


def _real_trunk(**kwargs: object) -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm needs torchvision, which this machine cannot install")
    options: dict[str, object] = dict(
        img_size=24, patch_size=P, embed_dim=32, depth=3, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    options.update(kwargs)
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**options).double().eval()


@pytest.mark.parametrize("reg_tokens", [0, 4], ids=["cls", "cls+registers"])
def test_real_timm_matches_forward_features(reg_tokens: int) -> None:
    trunk = _real_trunk(reg_tokens=reg_tokens)
    tower = _tower(trunk, deepstack_visual_indexes=[1])
    clips = _clips(GRID, seed=3)
    rows, grid = _rows(clips, GRID), torch.tensor(GRID)
    with torch.no_grad():
        out = tower(rows, grid)
        want = _reference_tokens(trunk, clips, GRID)
    torch.testing.assert_close(out.last_hidden_state, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.merged, tower.merger(want), rtol=0, atol=1e-10)
    assert len(out.deepstack) == 1 and out.deepstack[0].shape == out.merged.shape


def test_real_timm_by_name_and_patch_check() -> None:
    pytest.importorskip("timm", reason="timm needs torchvision, which this machine cannot install")
    tower = TimmVisionTower("vit_tiny_patch16_224", out_hidden_size=16, img_size=64).eval()
    assert tower.patch_size == 16 and tower.hidden_size == 192
    grid = torch.tensor([[1, 2, 4], [2, 2, 2]])
    with torch.no_grad():
        out = tower(torch.randn(int(grid.prod(-1).sum()), tower.patch_dim), grid)
    assert out.merged.shape == (4, 16)
    with pytest.raises(ValueError, match="patch_size = 14"):
        TimmVisionTower(tower.trunk, out_hidden_size=16, patch_size=14)
