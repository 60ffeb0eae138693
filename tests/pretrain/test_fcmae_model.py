"""The FCMAE model: masking, patchify, the loss, backends, and that it learns."""

import pytest
import torch

import sparse.grn
from fcmae import build_fcmae, patchify, random_mask, unpatchify
from fcmae.model import _patch_mean_std
from fcmae.pretrain.optim import build_optimizer
from sparse.masking import check_mask_ratio
from tests.helpers import assert_close

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), decoder_dim=32)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(img_size=64, **kw):
    args = {**TINY, **kw}
    return build_fcmae("atto", img_size=img_size, **args)


# ---------------------------------------------------------------- masks
def test_random_mask_keeps_same_count_and_is_seeded():
    torch.manual_seed(3)
    m1 = random_mask(5, 49, 0.6)
    torch.manual_seed(3)
    m2 = random_mask(5, 49, 0.6)
    assert torch.equal(m1, m2)
    assert m1.shape == (5, 49)
    assert torch.all((1 - m1).sum(1) == 19)  # int(49 * 0.4)
    assert set(m1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(m1[0], m1[1]) or not torch.equal(m1[1], m1[2])  # differs per image
    torch.manual_seed(4)
    assert not torch.equal(random_mask(5, 49, 0.6), m1)


@pytest.mark.parametrize("ratio, patches", [(0.0, 49), (1.0, 49), (-0.1, 49), (0.8, 4), (0.99, 49)])
def test_bad_mask_ratio_is_a_clear_error(ratio, patches):
    with pytest.raises(ValueError, match="mask_ratio"):
        check_mask_ratio(ratio, patches)


def test_build_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_model(img_size=80)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_model(patch_size=16)
    with pytest.raises(ValueError, match="no visible patch"):
        tiny_model(img_size=64, mask_ratio=0.8)
    with pytest.raises(ValueError, match="unknown ConvNeXt V2 size"):
        build_fcmae("giant")


# ---------------------------------------------------------------- patchify
def test_patchify_order_and_round_trip():
    imgs = torch.randn(2, 3, 64, 96)
    patches = patchify(imgs)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    # patch (r=1, c=2) is index 1*3+2 = 5; inside it, value (row 4, col 7, channel 1)
    assert patches[1, 5, (4 * 32 + 7) * 3 + 1] == imgs[1, 1, 32 + 4, 64 + 7]
    assert torch.equal(unpatchify(patches, (2, 3)), imgs)
    with pytest.raises(ValueError):
        unpatchify(patches, (3, 3))


# ---------------------------------------------------------------- the loss
def reference_loss(imgs, pred, mask, norm_pix):
    """Patch by patch, with plain loops: per-patch MSE averaged over masked patches."""
    n, _, h, w = imgs.shape
    gw = w // 32
    total, count = 0.0, 0
    for i in range(n):
        for idx in range(mask.shape[1]):
            if mask[i, idx] == 0:
                continue
            r, c = divmod(idx, gw)
            patch = imgs[i, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[i, idx].double() - patch) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_computed_reference(norm_pix):
    torch.manual_seed(0)
    model = tiny_model(img_size=64, mask_ratio=0.5, norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 64, 64)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    loss, pred, out_mask = model(imgs, mask)
    assert pred.shape == (3, 4, 3072)
    assert torch.equal(out_mask, mask)
    assert loss.item() == pytest.approx(reference_loss(imgs, pred.detach(), mask, norm_pix), rel=1e-5)


def test_flat_patches_give_a_finite_loss_and_gradients():
    """A constant patch (a flat background) has zero variance: the normalised target's epsilon keeps the loss
    and every parameter's gradient finite."""
    torch.manual_seed(0)
    model = tiny_model(img_size=64, mask_ratio=0.5, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 64, 64)
    imgs[0, :, :32, :32] = 0.7  # a flat masked patch whose mean is rounded: the centred patch is tiny noise
    imgs[1] = 0.5  # a whole flat image whose mean is exact: the centred patches are exactly zero
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.float32)
    loss, pred, _ = model(imgs, mask)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert loss.item() == pytest.approx(reference_loss(imgs, pred.detach(), mask, True), rel=1e-5)
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_only_masked_patches_contribute():
    torch.manual_seed(0)
    model = tiny_model(img_size=64, mask_ratio=0.5)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    _, pred, _ = model(imgs, mask)
    pred = pred.detach()
    base = model.forward_loss(imgs, pred, mask)
    changed_visible = pred.clone()
    changed_visible[mask == 0] += 100.0
    assert model.forward_loss(imgs, changed_visible, mask).item() == pytest.approx(base.item(), rel=1e-6)
    changed_masked = pred.clone()
    changed_masked[0, 0] += 1.0
    assert model.forward_loss(imgs, changed_masked, mask).item() != pytest.approx(base.item(), rel=1e-3)


def test_prediction_ignores_visible_content_at_masked_sites():
    """The decoder sees the mask token, not encoder features, at masked sites; the encoder sees visible patches."""
    torch.manual_seed(0)
    model = tiny_model(img_size=64, mask_ratio=0.5).eval()
    imgs = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[1, 0, 1, 0]], dtype=torch.float32)
    edited = imgs.clone()
    edited[:, :, :32, :32] = 5.0  # patch 0: masked
    with torch.no_grad():
        _, p1, _ = model(imgs, mask)
        _, p2, _ = model(edited, mask)
    assert torch.allclose(p1, p2)  # masked pixels never reach the predictions
    edited[:, :, :32, 32:] = 5.0  # patch 1: visible
    with torch.no_grad():
        _, p3, _ = model(edited, mask)
    assert not torch.allclose(p1, p3)  # ... while visible pixels do (the test above is not vacuous)


def test_a_mask_that_hides_nothing_is_refused():
    model = tiny_model(img_size=64, mask_ratio=0.5)
    with pytest.raises(ValueError, match="hides no patch"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 4))


def test_masked_sites_get_the_mask_token():
    model = tiny_model(img_size=64, mask_ratio=0.5)
    feats = torch.randn(1, 16, 2, 2)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    seen = {}
    model.decoder.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    model.forward_decoder(feats, mask)
    x = seen["x"]
    token = model.mask_token[0, :, 0, 0]
    assert torch.equal(x[0, :, 0, 0], token) and torch.equal(x[0, :, 1, 1], token)
    assert torch.allclose(x[0, :, 0, 1], model.proj(feats)[0, :, 0, 1])


def test_torch_and_dense_masked_backends_agree(one_thread):
    torch.manual_seed(0)
    model = tiny_model(img_size=96, mask_ratio=0.6)
    imgs = torch.randn(3, 3, 96, 96)
    mask = model.random_mask(imgs)
    losses, grads = [], []
    for backend in ("torch", "dense-masked"):
        model.set_backend(backend)
        model.zero_grad()
        loss, _, _ = model(imgs, mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name


def test_parameter_names_and_no_weight_decay_groups():
    model = tiny_model()
    names = dict(model.named_parameters())
    assert "mask_token" in names and names["mask_token"].shape == (1, 32, 1, 1)
    assert "proj.weight" in names and "pred.weight" in names and "decoder.0.mlp.grn.weight" in names
    assert any(k.startswith("encoder.stages.0.blocks.0.") for k in names)
    assert names["pred.weight"].shape == (3072, 32, 1, 1)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(names["mask_token"]) in no_decay
    for key in ("proj.bias", "decoder.0.norm.weight", "decoder.0.mlp.grn.weight", "decoder.0.mlp.grn.bias",
                "encoder.stages.0.blocks.0.mlp.grn.weight", "encoder.stem.1.weight"):
        assert id(names[key]) in no_decay, key
    for key in ("proj.weight", "pred.weight", "encoder.stages.0.blocks.0.mlp.fc1.weight"):
        assert id(names[key]) in decay, key
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_reconstruct_inverts_patch_normalisation():
    model = tiny_model(img_size=64, mask_ratio=0.5)
    imgs = torch.randn(2, 3, 64, 64)
    target = model.target(imgs)  # a perfect prediction in normalised space
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)  # normalised per patch
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-3)
    assert torch.allclose(model.reconstruct(imgs, target), imgs, atol=1e-4)
    raw = tiny_model(img_size=64, mask_ratio=0.5, norm_pix_loss=False)
    assert torch.equal(raw.target(imgs), patchify(imgs))
    assert torch.equal(raw.reconstruct(imgs, patchify(imgs)), imgs)


@pytest.mark.slow
def test_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    model = tiny_model(img_size=64, mask_ratio=0.5)
    imgs = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(imgs)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss, _, _ = model(imgs, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    final = model(imgs, mask)[0].item()
    assert first > 0.5
    assert final < first / 20, (first, final)


# ---------------------------------------------------------------- the decoder's faster parts
def _randomised(module, seed=0):
    """Random values in every parameter (GRN's gamma and beta start at zero, which would hide it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return module


def test_decoder_is_timms_block_with_convs_as_linear_layers(one_thread):
    """forward_decoder equals 1x1 convs around timm's own ConvNeXt V2 block (same state dict), values and grads."""
    from timm.models.convnext import ConvNeXtBlock

    model = _randomised(tiny_model(img_size=96, mask_ratio=0.6))
    block = ConvNeXtBlock(32, ls_init_value=None, use_grn=True, conv_mlp=False)
    block.load_state_dict(model.decoder[0].state_dict())  # strict: the same names and shapes
    assert type(model.decoder[0].conv_dw) is not torch.nn.Conv2d  # the faster parts are in place
    assert isinstance(model.decoder[0].mlp.grn, sparse.grn.GlobalResponseNorm)
    feats = torch.randn(3, 16, 3, 3, requires_grad=True)
    mask = model.random_mask(torch.zeros(3, 3, 96, 96))
    grad_out = torch.randn(3, 9, 3072)

    pred = model.forward_decoder(feats, mask)
    grads = torch.autograd.grad(pred, [feats] + list(model.parameters()), grad_out, allow_unused=True)

    def reference():
        x = model.proj(feats)
        m = mask.reshape(3, 1, 3, 3)
        x = x * (1 - m) + model.mask_token * m
        return model.pred(block(x)).flatten(2).transpose(1, 2)

    expected = reference()
    params = [feats] + [p for n, p in model.named_parameters() if not n.startswith("decoder.")] + list(
        block.parameters())
    expected_grads = dict(zip(map(id, params), torch.autograd.grad(expected, params, grad_out, allow_unused=True)))
    assert_close(pred, expected)
    ours = dict(zip([id(feats)] + [id(p) for p in model.parameters()], grads))
    assert_close(ours[id(feats)], expected_grads[id(feats)])
    for param, theirs in zip(model.decoder[0].parameters(), block.parameters()):
        assert_close(ours[id(param)], expected_grads[id(theirs)])
    for name in ("proj.weight", "proj.bias", "pred.weight", "pred.bias", "mask_token"):
        param = dict(model.named_parameters())[name]
        assert_close(ours[id(param)], expected_grads[id(param)])


def test_patch_statistics_equal_torch_var():
    patches = torch.randn(2, 5, 48) * 3 + 1
    mean, std = _patch_mean_std(patches)
    assert torch.allclose(mean, patches.mean(-1, keepdim=True))
    assert torch.allclose(std, (patches.var(-1, keepdim=True) + 1e-6) ** 0.5, rtol=1e-5)
