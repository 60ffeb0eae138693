"""The sparse encoder's contract (README, 'Tested contract').

1. nothing masked: sparse encoder == timm's dense convnextv2 features;
2. any mask: `torch` backend == `dense-masked` reference at visible sites,
   exact zeros at masked sites, same gradients for the input and every weight;
3. an image's output does not depend on the rest of the batch.

All in fp32 with random weights (norm affines and GRN gamma/beta included).
The tolerance is relative to the output's scale: 1e-5 for forward values;
gradients add up many more terms (sums over sites and images), so they get
1e-4 relative to the gradient's scale.
"""

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt

import sparse
from fcmae.weights.conversion import to_timm
from sparse.sizes import MODEL_SIZES
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, random_mask, randomize_

CONFIGS = {
    # name: (size, depths, dims, image height, image width)
    "atto": ("atto", None, None, 96, 96),
    "custom": ("atto", TINY_DEPTHS, TINY_DIMS, 64, 96),
}


def make_encoder(config, seed, backend="torch"):
    size, depths, dims, _, _ = CONFIGS[config]
    encoder = sparse.build_encoder(size, backend=backend, depths=depths, dims=dims)
    return randomize_(encoder, seed)


def make_images(config, batch, seed):
    _, _, _, h, w = CONFIGS[config]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def dense_timm_model(encoder):
    """timm's dense ConvNeXt V2 with the encoder's weights."""
    if encoder.size is not None:
        model = timm.create_model(f"convnextv2_{encoder.size}", num_classes=10)
        weights = to_timm(encoder.state_dict())
    else:
        model = ConvNeXt(depths=encoder.depths, dims=encoder.dims, ls_init_value=None, use_grn=True, num_classes=10)
        weights = to_timm(encoder.state_dict(), conv_mlp=False)
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    return model.eval()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_unmasked_equals_timm_dense(config, seed):
    encoder = make_encoder(config, seed).eval()
    dense = dense_timm_model(encoder)
    imgs = make_images(config, 2, seed)
    with torch.no_grad():
        expected = dense.forward_features(imgs)
        assert_close(encoder(imgs), expected)
        no_mask = torch.zeros(imgs.shape[0], (imgs.shape[2] // 32) * (imgs.shape[3] // 32))
        assert_close(encoder(imgs, no_mask), expected)
        assert_close(encoder.set_backend("dense-masked")(imgs), expected)


def test_custom_conv_mlp_layout_equals_timm_dense():
    """to_timm's 1x1-conv layout (timm's atto..nano) gives the same features."""
    encoder = make_encoder("custom", 3).eval()
    dense = ConvNeXt(depths=TINY_DEPTHS, dims=TINY_DIMS, ls_init_value=None, use_grn=True, conv_mlp=True).eval()
    dense.load_state_dict(to_timm(encoder.state_dict(), conv_mlp=True), strict=False)
    imgs = make_images("custom", 2, 3)
    with torch.no_grad():
        assert_close(encoder(imgs), dense.forward_features(imgs))


def forward_and_grads(encoder, imgs, mask, out_weights):
    imgs = imgs.clone().requires_grad_(True)
    encoder.zero_grad()
    out = encoder(imgs, mask)
    (out * out_weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return out.detach(), imgs.grad, grads


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("seed,batch,mask_ratio", [(0, 3, 0.6), (1, 2, 0.3), (2, 4, 0.85)])
def test_masked_torch_backend_equals_dense_masked(config, seed, batch, mask_ratio):
    imgs = make_images(config, batch, seed)
    num_patches = (imgs.shape[2] // 32) * (imgs.shape[3] // 32)
    num_masked = min(int(num_patches * mask_ratio), num_patches - 1)
    mask = random_mask(batch, num_patches, num_masked, seed)
    sparse_encoder = make_encoder(config, seed, backend="torch")
    reference = make_encoder(config, seed, backend="dense-masked")
    out_weights = torch.randn(batch, sparse_encoder.num_features, imgs.shape[2] // 32, imgs.shape[3] // 32)

    out, img_grad, grads = forward_and_grads(sparse_encoder, imgs, mask, out_weights)
    ref_out, ref_img_grad, ref_grads = forward_and_grads(reference, imgs, mask, out_weights)

    masked_sites = mask.reshape(batch, 1, imgs.shape[2] // 32, imgs.shape[3] // 32).bool()
    masked_sites = masked_sites.expand_as(out)
    assert torch.all(out[masked_sites] == 0), "masked sites must be exact zeros"
    assert torch.all(ref_out[masked_sites] == 0)
    assert (out[~masked_sites] != 0).float().mean() > 0.99, "visible sites carry features"
    assert_close(out, ref_out)
    assert_close(img_grad, ref_img_grad, rel=1e-4)
    # Pixels of masked patches never reach the output.
    pixel_mask = masked_sites[:, :1].repeat_interleave(32, 2).repeat_interleave(32, 3).expand_as(img_grad)
    assert torch.all(img_grad[pixel_mask] == 0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().max() > 0, f"no gradient reached {name}"
        assert_close(grads[name], ref_grads[name], rel=1e-4)


@pytest.mark.parametrize("backend", ["torch", "dense-masked"])
@pytest.mark.parametrize("masked", [False, True])
def test_output_does_not_depend_on_batch(backend, masked):
    """GRN statistics are per image: image i's output is the same alone or in a batch."""
    encoder = make_encoder("custom", 5, backend=backend).eval()
    imgs = make_images("custom", 4, 5)
    mask = random_mask(4, 6, 3, 5) if masked else None
    with torch.no_grad():
        together = encoder(imgs, mask)
        for i in range(4):
            alone = encoder(imgs[i:i + 1], None if mask is None else mask[i:i + 1])
            assert_close(alone[0], together[i])


def test_drop_path_drops_whole_images_like_the_reference():
    """In training, drop path is per image and both backends draw the same images."""
    imgs = make_images("custom", 4, 7)
    mask = random_mask(4, 6, 3, 7)
    outs = {}
    for backend in ("torch", "dense-masked"):
        encoder = sparse.build_encoder("atto", backend, TINY_DEPTHS, TINY_DIMS, drop_path_rate=0.5)
        randomize_(encoder, 7).train()
        torch.manual_seed(123)
        outs[backend] = encoder(imgs, mask).detach()
    assert_close(outs["torch"], outs["dense-masked"])

    sites = sparse.sites.PatchSites(mask.reshape(4, 2, 3) == 0)
    torch.manual_seed(0)
    dropped = sites.drop_path(torch.ones(64, 3, 2, 2, 5), 0.5, training=True)
    per_image = dropped.flatten(1)
    assert torch.all((per_image == 0).all(1) | (per_image == 2).all(1)), "each image is dropped whole or kept"
    assert 0 < (per_image == 0).all(1).sum() < 64


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_parameters_match_timm_for_every_size(size):
    with torch.device("meta"):
        encoder = sparse.build_encoder(size)
        dense = timm.create_model(f"convnextv2_{size}")
    dense_body = {k: v for k, v in dense.state_dict().items() if not k.startswith("head.")}
    converted = to_timm(encoder.state_dict())
    assert converted.keys() == dense_body.keys()
    for key, value in converted.items():
        assert value.shape == dense_body[key].shape, key
    assert sum(p.numel() for p in encoder.parameters()) == sum(v.numel() for v in dense_body.values())
    assert (encoder.depths, encoder.dims) == MODEL_SIZES[size]


def test_sizes_registry_param_counts_match_the_paper():
    """Classifier params (1000 classes) as published: 3.7M atto ... 660M huge."""
    published_millions = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6, "base": 89,
                          "large": 198, "huge": 660}
    for size, millions in published_millions.items():
        with torch.device("meta"):
            encoder = sparse.build_encoder(size)
        c = encoder.num_features
        head = 2 * c + c * 1000 + 1000
        total = (sum(p.numel() for p in encoder.parameters()) + head) / 1e6
        assert abs(total - millions) / millions < 0.02, (size, total)


# -- bad input -----------------------------------------------------------------

def test_unknown_size_lists_the_sizes():
    with pytest.raises(ValueError, match="atto, femto, pico, nano, tiny, base, large, huge"):
        sparse.build_encoder("medium")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        sparse.build_encoder("atto", backend="jax")


@pytest.mark.parametrize("kwargs,message", [
    (dict(depths=(1, 1, 1)), "4 stages"),
    (dict(dims=(8, 16, 0, 32)), "positive"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_bad_architecture_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparse.build_encoder("atto", **kwargs)


@pytest.fixture(scope="module")
def small_encoder():
    return sparse.build_encoder("atto", depths=TINY_DEPTHS, dims=TINY_DIMS)


@pytest.mark.parametrize("make_inputs,error,message", [
    (lambda: (torch.randn(2, 3, 64, 80), None), ValueError, "multiples of 32, got 64x80"),
    (lambda: (torch.randn(2, 3, 48, 64), None), ValueError, "multiples of 32"),
    (lambda: (torch.randn(3, 64, 64), None), ValueError, r"\(N, 3, H, W\)"),
    (lambda: (torch.randn(2, 1, 64, 64), None), ValueError, "3 channels"),
    (lambda: (torch.randn(2, 3, 64, 64), torch.zeros(2, 5)), ValueError, r"shape \(N, L\) = \(2, 4\)"),
    (lambda: (torch.randn(2, 3, 64, 64), torch.zeros(3, 4)), ValueError, r"\(2, 4\)"),
    (lambda: (torch.randn(2, 3, 64, 64), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])), ValueError,
     r"same number of visible patches in every image, got \[3, 2\]"),
    (lambda: (torch.randn(2, 3, 64, 64), torch.full((2, 4), 0.5)), ValueError, "0 \\(visible\\) or 1"),
    (lambda: (torch.randint(0, 255, (2, 3, 64, 64)), None), TypeError, "floating-point"),
    (lambda: (torch.randn(2, 3, 64, 64, device="meta"), None), ValueError, "imgs are on meta"),
    (lambda: (torch.randn(2, 3, 64, 64), torch.zeros(2, 4, device="meta")), ValueError, "mask is on meta"),
])
def test_bad_inputs_get_clear_errors(small_encoder, make_inputs, error, message):
    imgs, mask = make_inputs()
    with pytest.raises(error, match=message):
        small_encoder(imgs, mask)


def test_unequal_kept_counts_work_with_the_dense_masked_backend(small_encoder):
    reference = sparse.build_encoder("atto", "dense-masked", TINY_DEPTHS, TINY_DIMS)
    reference.load_state_dict(small_encoder.state_dict())
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])
    out = reference(torch.randn(2, 3, 64, 64), mask)
    assert torch.all(out.flatten(2)[mask.bool().unsqueeze(1).expand(-1, 32, -1)] == 0)


def test_bfloat16_autocast_matches_fp32_loosely():
    """AMP: forward and backward run under autocast; bf16 keeps ~3 significant digits."""
    encoder = make_encoder("custom", 9)
    imgs = make_images("custom", 2, 9)
    mask = random_mask(2, 6, 3, 9)
    out_weights = torch.randn(2, encoder.num_features, 2, 3)
    out32, img_grad32, grads32 = forward_and_grads(encoder, imgs, mask, out_weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, img_grad16, grads16 = forward_and_grads(encoder, imgs, mask, out_weights)
    assert out16.dtype == torch.bfloat16
    assert_close(out16.float(), out32, rel=5e-2)
    conv_dw = "stages.0.blocks.0.conv_dw.weight"
    assert grads16[conv_dw].dtype == torch.float32
    assert_close(grads16[conv_dw], grads32[conv_dw], rel=1e-1)
