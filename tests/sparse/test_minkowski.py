"""The `minkowski` backend == the `torch` backend (and the dense-masked oracle).

Skipped, with the reason shown by `pytest -ra`, when MinkowskiEngine is not
installed; `bash launch/test_minkowski.sh` builds it with the repository's own
recipe and runs this file. See docs/MINKOWSKI.md.

Checked: forward values at visible sites and exact zeros elsewhere, gradients
of the input and of every weight, several masks and batch sizes, batch
independence, drop path (same random draws as timm's), and that a state dict
trained with one backend gives the same outputs with the others. Tolerances
as in tests/sparse/test_encoder.py (1e-5 forward, 1e-4 gradients, relative to the
scale): the only difference is the order in which the sparse convolutions add
up their terms.
"""

import pytest

pytest.importorskip(
    "MinkowskiEngine",
    reason="MinkowskiEngine is not installed: build it with `bash launch/install_minkowski.sh cpu` "
    "and run `bash launch/test_minkowski.sh` (docs/MINKOWSKI.md)",
)

import torch  # noqa: E402

import sparse  # noqa: E402
from sparse.minkowski import (  # noqa: E402
    MinkowskiSites,
    conv_from_me,
    conv_to_me,
    depthwise_from_me,
    depthwise_to_me,
)
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, random_mask, randomize_  # noqa: E402

CONFIGS = {
    # name: (size, depths, dims, image height, image width)
    "custom": ("atto", TINY_DEPTHS, TINY_DIMS, 64, 96),
    "atto": ("atto", None, None, 96, 96),
    "atto224": ("atto", None, None, 224, 224),
}


def make_encoder(config, seed, backend):
    size, depths, dims, _, _ = CONFIGS[config]
    return randomize_(sparse.build_encoder(size, backend=backend, depths=depths, dims=dims), seed)


def make_images(config, batch, seed):
    _, _, _, h, w = CONFIGS[config]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def num_patches(config):
    _, _, _, h, w = CONFIGS[config]
    return (h // 32) * (w // 32)


def forward_backward(encoder, imgs, mask, seed=0):
    """Output, gradient of the images, gradients of all weights, for a random linear loss."""
    encoder.zero_grad()
    imgs = imgs.clone().requires_grad_(True)
    out = encoder(imgs, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1000))
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return out.detach(), imgs.grad, grads


def assert_same_run(actual, expected, mask_grid):
    out, gimg, grads = actual
    out_ref, gimg_ref, grads_ref = expected
    assert_close(out, out_ref)
    masked = mask_grid.unsqueeze(1).expand_as(out).bool()
    assert torch.all(out[masked] == 0), "masked sites must be exact zeros"
    assert_close(gimg, gimg_ref, rel=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], rel=1e-4)


def mask_grid(config, mask):
    _, _, _, h, w = CONFIGS[config]
    return mask.reshape(mask.shape[0], h // 32, w // 32)


# -- kernel layout ----------------------------------------------------------------


def test_kernel_layout_round_trips():
    w = torch.randn(5, 1, 7, 7)
    assert torch.equal(depthwise_from_me(depthwise_to_me(w)), w)
    v = torch.randn(6, 5, 2, 2)
    assert torch.equal(conv_from_me(conv_to_me(v)), v)
    assert depthwise_to_me(w).shape == (49, 5) and conv_to_me(v).shape == (4, 5, 6)


def test_single_site_depthwise_matches_torch_offsets():
    """One visible patch, a one-hot input: each output site sees exactly one kernel tap."""
    visible = torch.zeros(1, 2, 2, dtype=torch.bool)
    visible[0, 1, 0] = True
    sites = MinkowskiSites(visible)
    conv = torch.nn.Conv2d(3, 3, 7, padding=3, groups=3)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    dense_in = torch.zeros(1, 3, 16, 16)
    dense_in[0, :, 11, 3] = torch.tensor([1.0, 2.0, 3.0])  # inside the kept patch (rows 8..15, cols 0..7)
    x = dense_in.permute(0, 2, 3, 1)[sites.batch_index, sites.rows, sites.cols]
    out = sites.to_dense(sites.depthwise_conv(x, conv))
    expected = conv(dense_in) * visible.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    assert_close(out, expected.detach())


# -- forward and gradients: minkowski == torch ----------------------------------------------


@pytest.mark.parametrize(
    "config,batch,num_masked,seed",
    [
        ("custom", 1, 0, 0),  # nothing masked
        ("custom", 1, 3, 1),
        ("custom", 3, 4, 2),
        ("custom", 4, 5, 3),  # a single kept patch per image
        ("atto", 2, 5, 4),
        ("atto224", 2, 29, 5),  # FCMAE's ratio: 19 of 49 patches kept
    ],
)
def test_minkowski_equals_torch(config, batch, num_masked, seed):
    imgs = make_images(config, batch, seed)
    mask = random_mask(batch, num_patches(config), num_masked, seed)
    reference = forward_backward(make_encoder(config, seed, "torch"), imgs, mask, seed)
    actual = forward_backward(make_encoder(config, seed, "minkowski"), imgs, mask, seed)
    assert_same_run(actual, reference, mask_grid(config, mask))


def test_minkowski_any_mask_equals_dense_masked():
    """Unequal keep counts per image (not possible with `torch`): compare to the oracle."""
    config, batch, seed = "custom", 3, 7
    imgs = make_images(config, batch, seed)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float)
    reference = forward_backward(make_encoder(config, seed, "dense-masked"), imgs, mask, seed)
    actual = forward_backward(make_encoder(config, seed, "minkowski"), imgs, mask, seed)
    assert_same_run(actual, reference, mask_grid(config, mask))


@pytest.mark.parametrize("config", ["custom", "atto"])
def test_minkowski_batch_independence(config):
    batch, seed = 3, 11
    encoder = make_encoder(config, seed, "minkowski").eval()
    imgs = make_images(config, batch, seed)
    mask = random_mask(batch, num_patches(config), 3, seed)
    with torch.no_grad():
        together = encoder(imgs, mask)
        for i in range(batch):
            assert_close(encoder(imgs[i:i + 1], mask[i:i + 1])[0], together[i])


def test_minkowski_drop_path_matches_torch():
    """Training mode with drop path: same random draws as timm's drop path in `torch`."""
    config, batch, seed = "custom", 4, 13
    size, depths, dims, _, _ = CONFIGS[config]
    encoders = {
        b: randomize_(sparse.build_encoder(size, backend=b, depths=depths, dims=dims, drop_path_rate=0.5), seed).train()
        for b in ("torch", "minkowski")
    }
    imgs = make_images(config, batch, seed)
    mask = random_mask(batch, num_patches(config), 2, seed)
    runs = {}
    for backend, encoder in encoders.items():
        torch.manual_seed(123)
        runs[backend] = forward_backward(encoder, imgs, mask, seed)
    assert_same_run(runs["minkowski"], runs["torch"], mask_grid(config, mask))


# -- checkpoints are shared ---------------------------------------------------------------------


@pytest.mark.parametrize("trained_with", ["minkowski", "torch"])
def test_checkpoint_trained_with_one_backend_runs_on_the_others(trained_with, tmp_path):
    config, batch, seed = "custom", 2, 17
    encoder = make_encoder(config, seed, trained_with)
    imgs = make_images(config, batch, seed)
    mask = random_mask(batch, num_patches(config), 2, seed)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        encoder(imgs, mask).square().mean().backward()
        optimizer.step()
    path = tmp_path / "encoder.pth"
    torch.save({"model": encoder.state_dict()}, path)
    state = torch.load(path, weights_only=True)["model"]
    outputs = {}
    for backend in ("minkowski", "torch", "dense-masked"):
        size, depths, dims, _, _ = CONFIGS[config]
        other = sparse.build_encoder(size, backend=backend, depths=depths, dims=dims).eval()
        other.load_state_dict(state)  # strict: the same keys and shapes for every backend
        with torch.no_grad():
            outputs[backend] = other(imgs, mask)
    assert_close(outputs["minkowski"], outputs["torch"])
    assert_close(outputs["dense-masked"], outputs["torch"])
    # Switching the backend of one model in place keeps its parameters.
    encoder.eval().set_backend("torch")
    with torch.no_grad():
        assert_close(encoder(imgs, mask), outputs["minkowski"])


def test_minkowski_rejects_wrong_feature_rows():
    visible = torch.ones(1, 1, 1, dtype=torch.bool)
    sites = MinkowskiSites(visible)
    conv = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    with pytest.raises(ValueError, match="feature matrix"):
        sites.depthwise_conv(torch.zeros(5, 4), conv)


def test_sites_are_an_me_sparse_tensor():
    """The feature rows and ME's coordinates agree at every stage (stride 1, 2, 4, 8)."""
    visible = torch.tensor([[[True, False], [False, True]], [[False, True], [False, False]]])
    sites = MinkowskiSites(visible)
    conv = torch.nn.Conv2d(3, 3, 2, stride=2)
    x = torch.randn(sites.num_sites, 3)
    for stride in (1, 2, 4, 8):
        st = sites.as_sparse_tensor(x)
        assert st.tensor_stride == [stride, stride]
        coords = st.C.long()
        assert torch.equal(coords[:, 0], sites.batch_index)
        assert torch.equal(coords[:, 1], sites.rows * stride) and torch.equal(coords[:, 2], sites.cols * stride)
        per_image = torch.bincount(sites.batch_index, minlength=2).tolist()
        assert per_image == [2 * (8 // stride) ** 2, (8 // stride) ** 2]
        if stride < 8:
            x = sites.downsample(x, conv)
