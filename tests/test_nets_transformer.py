"""Tests of the transformer denoiser networks: U-ViT (Bao et al. 2023) and DiT (Peebles & Xie 2023)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_repro.nets.dit import DIT_CONFIGS, DiT, DiT_B_2, DiT_S_2, sincos_pos_embed_2d
from lightning_repro.nets.uvit import UVIT_CONFIGS, UViT


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_uvit(res: int = 8, ch: int = 1, num_classes: int = 0, **kw) -> UViT:
    return UViT(res, ch, ch, num_classes=num_classes, embed_dim=32, depth=2, num_heads=4, **kw)


def tiny_dit(res: int = 8, ch: int = 1, num_classes: int = 0, **kw) -> DiT:
    return DiT(res, ch, ch, num_classes=num_classes, hidden_size=32, depth=2, num_heads=4, **kw)


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every trainable parameter so that zero-initialised (adaLN-Zero) layers become active."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- parameter counts


def test_uvit_s2_parameter_counts_match_reference() -> None:
    # baofff/U-ViT configs/cifar10_uvit_small.py: 13 blocks of width 512; the conditional model adds an
    # 11-row label table (null class for CFG) and one position-embedding row for the label token.
    with torch.device("meta"):
        uncond = UViT(32, 3, 3, **UVIT_CONFIGS["U-ViT-S/2"])
        cond = UViT(32, 3, 3, num_classes=10, **UVIT_CONFIGS["U-ViT-S/2"])
    assert len(uncond.in_blocks) + 1 + len(uncond.out_blocks) == 13
    assert n_params(uncond) == 44_255_328
    assert n_params(cond) == 44_255_328 + 11 * 512 + 512 == 44_261_472
    assert cond.label_emb.num_embeddings == 11


def test_dit_parameter_counts_match_reference() -> None:
    with torch.device("meta"):
        small = DiT_S_2(32, 3, 3, num_classes=10)
        base = DiT(32, 3, 3, num_classes=10, **DIT_CONFIGS["DiT-B/2"])
        base_fn = DiT_B_2(32, 3, 3, num_classes=10)
        uncond = DiT_S_2(32, 3, 3, num_classes=0)
    assert n_params(small) == 32_573_964
    assert n_params(base) == n_params(base_fn) == 129_733_644
    # The frozen sin-cos position embedding is a parameter that does not require grad.
    assert not small.pos_embed.requires_grad and small.pos_embed.numel() == 256 * 384
    assert sum(p.numel() for p in small.parameters() if not p.requires_grad) == 256 * 384
    # Unconditional: no label embedder at all.
    assert uncond.y_embedder is None
    assert n_params(small) - n_params(uncond) == 11 * 384


def test_uvit_without_skip_drops_the_skip_linears() -> None:
    with_skip = UViT(8, 1, 1, embed_dim=32, depth=4, num_heads=4)
    without = UViT(8, 1, 1, embed_dim=32, depth=4, num_heads=4, skip=False)
    assert n_params(with_skip) - n_params(without) == 2 * (64 * 32 + 32)
    x = torch.randn(2, 1, 8, 8)
    assert without(x, torch.rand(2)).shape == (2, 1, 8, 8)


# ----------------------------------------------------------------------------- adaLN-Zero


def test_dit_at_init_is_identity_on_residual_stream_and_outputs_zero() -> None:
    torch.manual_seed(0)
    model = tiny_dit(res=8, ch=1, num_classes=3).eval()
    seen = []

    def check_block(module, args, output):
        seen.append(torch.equal(output, args[0]))

    hooks = [b.register_forward_hook(check_block) for b in model.blocks]
    final = []
    hooks.append(model.final_layer.register_forward_hook(lambda m, a, o: final.append(o)))
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0.5, 10.0, 500.0]), torch.tensor([0, 2, -1]))
    for h in hooks:
        h.remove()
    assert seen == [True, True]
    assert torch.count_nonzero(final[0]) == 0
    assert out.shape == (3, 1, 8, 8) and torch.count_nonzero(out) == 0


def test_dit_position_embedding_is_mae_sincos() -> None:
    pe = sincos_pos_embed_2d(8, 3)  # 3x3 grid, 8 channels: [col sin(2), col cos(2), row sin(2), row cos(2)]
    assert pe.shape == (9, 8) and pe.dtype == torch.float32
    token = 1 * 3 + 2  # row 1, column 2
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)  # 10000^(-i/2), i = 0, 1
    expected = torch.cat([(2 * w).sin(), (2 * w).cos(), (1 * w).sin(), (1 * w).cos()]).float()
    torch.testing.assert_close(pe[token], expected)
    model = tiny_dit(res=12, ch=1, patch_size=4)
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(32, 3))


# ----------------------------------------------------------------------------- shapes & conditioning


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
@pytest.mark.parametrize(("res", "ch"), [(8, 1), (32, 3)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shapes(make, res: int, ch: int, num_classes: int) -> None:
    model = make(res=res, ch=ch, num_classes=num_classes)
    x = torch.randn(2, ch, res, res)
    labels = torch.tensor([1, -1]) if num_classes else None
    out = model(x, torch.rand(2), labels)
    assert out.shape == (2, ch, res, res) and out.dtype == torch.float32


def test_out_channels_and_learn_sigma() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert UViT(8, 3, 5, embed_dim=32, depth=2, num_heads=4)(x, torch.rand(2)).shape == (2, 5, 8, 8)
    assert DiT(8, 3, 3, hidden_size=32, depth=1, num_heads=4, learn_sigma=True)(x, torch.rand(2)).shape == (
        2,
        6,
        8,
        8,
    )


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
def test_conditional_output_depends_on_label_and_null_class(make) -> None:
    torch.manual_seed(0)
    model = randomize_(make(num_classes=4)).eval()
    x, t = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8), torch.full((3,), 3.0)
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, -1]))
        out_none = model(x, t, None)
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-4
    # class_labels=None means the null class (label -1) for every sample.
    torch.testing.assert_close(out_none[0], out[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
def test_unconditional_ignores_labels_but_not_time(make) -> None:
    torch.manual_seed(0)
    model = randomize_(make(num_classes=0)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor([1.0, 1.0]))
        b = model(x, torch.tensor([1.0, 1.0]), torch.tensor([3, 7]))
        c = model(x, torch.tensor([1.0, 50.0]))
    assert torch.equal(a, b)
    torch.testing.assert_close(a[0], c[0], rtol=0, atol=1e-6)  # batch entries are independent ...
    assert (a[1] - c[1]).abs().max() > 1e-4  # ... and the time is used


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
def test_channels_last_input_gives_same_output(make) -> None:
    torch.manual_seed(0)
    model = randomize_(make(res=8, ch=3, num_classes=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, t, y)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_all_trainable_parameters_but_not_pos_embed() -> None:
    torch.manual_seed(0)
    model = randomize_(tiny_dit(num_classes=2))
    model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, -1])).square().mean().backward()
    assert model.pos_embed.grad is None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------------- SDPA


@pytest.mark.parametrize(("make", "n_blocks"), [(tiny_uvit, 3), (tiny_dit, 2)], ids=["uvit", "dit"])
def test_attention_goes_through_sdpa(monkeypatch, make, n_blocks: int) -> None:
    calls = []
    original = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = make(res=8, ch=1, num_classes=2)  # 4x4 patches; U-ViT adds time + label tokens
    model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert len(calls) == n_blocks
    tokens = 16 + (2 if make is tiny_uvit else 0)
    assert all(s == (2, 4, tokens, 8) for s in calls)  # (B, heads, L, head_dim)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [UViT, DiT])
def test_resolution_not_divisible_by_patch_size(cls) -> None:
    with pytest.raises(ValueError, match=r"img_resolution=10 is not divisible by patch_size=4"):
        cls(10, 1, 1, patch_size=4)


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
@pytest.mark.parametrize("bad", [4, -2])
def test_class_label_out_of_range(make, bad: int) -> None:
    model = make(num_classes=4)
    with pytest.raises(ValueError, match=rf"class label {bad} is out of range; expected labels in \[-1, 3\]"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, bad]))


def test_dit_without_label_dropout_has_no_null_class() -> None:
    model = tiny_dit(num_classes=4, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 4
    with pytest.raises(ValueError, match=r"class label -1 is out of range; expected labels in \[0, 3\]"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="class_labels are required"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2))


@pytest.mark.parametrize("make", [tiny_uvit, tiny_dit], ids=["uvit", "dit"])
def test_wrong_input_shape_and_label_dtype(make) -> None:
    model = make(num_classes=4)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels must be an integer tensor of shape"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0.0, 1.0]))
