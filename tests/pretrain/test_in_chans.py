"""in_chans 1..N: the sparse encoder, the FCMAE model, the converter and the reconstruction picture."""

import numpy as np
import pytest
import timm
import torch

import sparse
from fcmae.model import build_fcmae
from fcmae.pretrain.visualize import reconstruction_grid
from fcmae.weights.conversion import convert, to_timm, verify
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, randomize_


@pytest.mark.parametrize("in_chans", [1, 4])
def test_encoder_equals_timm_dense_with_in_chans(in_chans):
    encoder = randomize_(sparse.build_encoder("atto", depths=TINY_DEPTHS, dims=TINY_DIMS, in_chans=in_chans), 1).eval()
    dense = timm.create_model("convnextv2_atto", pretrained=False, depths=TINY_DEPTHS, dims=TINY_DIMS,
                              in_chans=in_chans, num_classes=0).eval()
    missing, unexpected = dense.load_state_dict(to_timm(encoder.state_dict(), conv_mlp=True), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    imgs = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(encoder(imgs), dense.forward_features(imgs), rel=1e-4)


def test_converted_weights_load_in_timm_create_model_with_in_chans():
    model = randomize_(build_fcmae("atto", img_size=64, depths=TINY_DEPTHS, dims=TINY_DIMS, decoder_dim=16,
                                   in_chans=4), 2)
    conversion = convert(model.state_dict(), conv_mlp=True)
    assert conversion.in_chans == 4
    assert verify(conversion) < 1e-3
    dense = timm.create_model("convnextv2_atto", pretrained=False, depths=TINY_DEPTHS, dims=TINY_DIMS, in_chans=4,
                              num_classes=5)
    missing, unexpected = dense.load_state_dict(conversion.state_dict, strict=False)
    assert not unexpected and missing and all(k.startswith("head.") for k in missing)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_fcmae_trains_with_in_chans(in_chans):
    torch.manual_seed(0)
    model = build_fcmae("atto", img_size=64, depths=TINY_DEPTHS, dims=TINY_DIMS, decoder_dim=16, in_chans=in_chans)
    assert model.pred.out_channels == 32 * 32 * in_chans
    imgs = torch.randn(2, in_chans, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 4, 32 * 32 * in_chans) and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.stem[0].weight.grad.shape[1] == in_chans
    assert model.reconstruct(imgs, pred).shape == imgs.shape
    with pytest.raises(ValueError, match=f"must have {in_chans} channels, got 3"):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_reconstruction_picture_shows_grey_or_the_first_three_channels(in_chans):
    torch.manual_seed(0)
    model = build_fcmae("atto", img_size=64, depths=TINY_DEPTHS, dims=TINY_DIMS, decoder_dim=16,
                        in_chans=in_chans).eval()
    imgs = torch.rand(2, in_chans, 64, 64)
    with torch.no_grad():
        _, pred, mask = model(imgs)
    mean, std = [0.0] * in_chans, [1.0] * in_chans
    picture = reconstruction_grid(model, imgs, mask, pred, mean=mean, std=std)
    assert picture.shape == (2 * 64 + 2, 4 * 64 + 6, 3) and picture.dtype == np.uint8
    original = picture[:64, :64].astype(int)
    if in_chans == 1:
        assert (original[..., 0] == original[..., 1]).all() and (original[..., 0] == original[..., 2]).all()
        expected = imgs[0, 0]
    else:
        expected = imgs[0, 2]  # the third channel is shown as blue
    np.testing.assert_array_equal(original[..., 2], (expected * 255).round().numpy().astype(int))
    with pytest.raises(ValueError, match=f"need {in_chans} values"):
        reconstruction_grid(model, imgs, mask, pred, mean=[0.0] * 2, std=[1.0] * 2)
