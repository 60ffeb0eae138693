"""Sparse -> dense conversion: every input format, every size, exact numerics, the command."""

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import sparse
from fcmae import build_fcmae
from fcmae.weights import conversion as conversion_lib
from fcmae.weights import layouts
from finetune import convert as cv
from sparse import minkowski
from sparse.sizes import MODEL_SIZES, TIMM_CONV_MLP_SIZES
from tests.helpers import randomize_

TINY_DEPTHS, TINY_DIMS = (1, 2, 1, 1), (8, 16, 24, 32)


def random_fcmae(depths=TINY_DEPTHS, dims=TINY_DIMS, seed=0):
    model = build_fcmae("atto", img_size=64, depths=depths, dims=dims, decoder_dim=16)
    return randomize_(model, seed).eval()


# ---------------------------------------------------------------- MinkowskiEngine kernel offsets
def me_style_conv(x, kernel, kernel_size, stride):
    """A direct simulation of MinkowskiEngine's convolution on a fully dense 2D sparse tensor.

    Written from ME's definitions, independently of the converter:
    coordinates are (batch, y, x) as `to_sparse` makes them from (N, C, H, W);
    a hypercube kernel's offsets are enumerated with the FIRST spatial axis
    (y) varying fastest; odd kernels are centred, even ones start at the
    output site; out(u) = sum_k in(u + offset_k) @ kernel[k]; a (K*K, C)
    kernel is channel-wise.
    """
    n, c, h, w = x.shape
    if kernel_size % 2:
        starts = [d - kernel_size // 2 for d in range(kernel_size)]
    else:
        starts = list(range(kernel_size))
    offsets = [(dy, dx) for dx in starts for dy in starts]  # dy (axis 1 = y) varies fastest
    out_h, out_w = h // stride, w // stride
    depthwise = kernel.dim() == 2
    c_out = c if depthwise else kernel.shape[2]
    out = torch.zeros(n, c_out, out_h, out_w, dtype=torch.float64)
    for b, oy, ox in itertools.product(range(n), range(out_h), range(out_w)):
        for k, (dy, dx) in enumerate(offsets):
            iy, ix = oy * stride + dy, ox * stride + dx
            if 0 <= iy < h and 0 <= ix < w:
                feat = x[b, :, iy, ix]
                out[b, :, oy, ox] += feat * kernel[k] if depthwise else feat @ kernel[k]
    return out


def test_me_depthwise_kernel_maps_to_the_torch_conv_that_computes_the_same():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64)
    kernel = torch.randn(49, 3, generator=gen, dtype=torch.float64)
    expected = me_style_conv(x, kernel, 7, 1)
    weight = layouts.me_kernel_to_dense(kernel)
    assert weight.shape == (3, 1, 7, 7)
    torch.testing.assert_close(F.conv2d(x, weight, padding=3, groups=3), expected, rtol=1e-12, atol=1e-12)
    # The naive row-major reading is wrong: the offsets really are transposed.
    naive = kernel.t().reshape(3, 1, 7, 7)
    assert not torch.allclose(F.conv2d(x, naive, padding=3, groups=3), expected)
    assert torch.equal(layouts.dense_to_me_kernel(weight), kernel)


def test_me_2x2_stride2_kernel_maps_to_the_torch_conv_that_computes_the_same():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 4, 5, generator=gen, dtype=torch.float64)  # (K*K, C_in, C_out)
    expected = me_style_conv(x, kernel, 2, 2)
    weight = layouts.me_kernel_to_dense(kernel)
    assert weight.shape == (5, 4, 2, 2)
    torch.testing.assert_close(F.conv2d(x, weight, stride=2), expected, rtol=1e-12, atol=1e-12)
    naive = kernel.permute(2, 1, 0).reshape(5, 4, 2, 2)
    assert not torch.allclose(F.conv2d(x, naive, stride=2), expected)
    assert torch.equal(layouts.dense_to_me_kernel(weight), kernel)


def test_me_offset_order_is_the_transpose_of_row_major():
    perm = minkowski.me_kernel_permutation(3)
    # ME offset k = ky + 3 * kx -> torch index ky * 3 + kx
    assert perm.tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


# ---------------------------------------------------------------- reference release layout
def reference_checkpoint(timm_weights, decoder_from=None):
    """A reference-release FCMAE checkpoint ({'model': ...}, ME layout) made from known dense weights."""
    state = layouts.to_reference_fcmae(timm_weights)
    if decoder_from is not None:
        state.update({k: v for k, v in decoder_from.items() if not k.startswith("encoder.")})
    return {"model": state}


def test_reference_layout_has_the_documented_keys_and_shapes():
    weights = conversion_lib.to_timm(random_fcmae().state_dict())
    ref = reference_checkpoint(weights)["model"]
    c0, c1 = TINY_DIMS[:2]
    expected = {
        "encoder.downsample_layers.0.0.weight": (c0, 3, 4, 4),
        "encoder.downsample_layers.0.1.weight": (c0,),
        "encoder.downsample_layers.1.0.ln.weight": (c0,),
        "encoder.downsample_layers.1.1.kernel": (4, c0, c1),
        "encoder.downsample_layers.1.1.bias": (1, c1),
        "encoder.stages.0.0.dwconv.kernel": (49, c0),
        "encoder.stages.0.0.dwconv.bias": (1, c0),
        "encoder.stages.0.0.norm.ln.weight": (c0,),
        "encoder.stages.0.0.pwconv1.linear.weight": (4 * c0, c0),
        "encoder.stages.0.0.grn.gamma": (1, 4 * c0),
        "encoder.stages.0.0.grn.beta": (1, 4 * c0),
        "encoder.stages.1.1.pwconv2.linear.bias": (c1,),
    }
    for key, shape in expected.items():
        assert tuple(ref[key].shape) == shape, key
    assert len(ref) == len(weights)


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_reference_fcmae_converts_bitwise_to_the_dense_weights_it_was_built_from(conv_mlp):
    fcmae = random_fcmae(seed=3)
    weights = conversion_lib.to_timm(fcmae.state_dict(), conv_mlp=conv_mlp)
    conversion = conversion_lib.convert(reference_checkpoint(weights, decoder_from=fcmae.state_dict()),
                                        conv_mlp=conv_mlp)
    assert conversion.source_format == "reference-fcmae"
    assert set(conversion.state_dict) == set(weights)
    for key, value in weights.items():
        assert torch.equal(conversion.state_dict[key], value), key
    dropped = set(conversion.dropped)
    assert dropped == {k for k in fcmae.state_dict() if not k.startswith("encoder.")}
    assert all(reason == layouts.DECODER_REASON for reason in conversion.dropped.values())


def test_reference_dense_layout_round_trips_and_matches_the_reference_model_names():
    weights = conversion_lib.to_timm(random_fcmae(seed=4).state_dict())
    ref = layouts.to_reference(weights)
    assert tuple(ref["stages.0.0.grn.gamma"].shape) == (1, 1, 1, 4 * TINY_DIMS[0])
    assert "downsample_layers.0.1.weight" in ref and "downsample_layers.3.1.weight" in ref
    assert tuple(ref["stages.3.0.pwconv1.weight"].shape) == (4 * TINY_DIMS[3], TINY_DIMS[3])
    back = conversion_lib.convert({"model": ref})
    assert back.source_format == "reference"
    assert all(torch.equal(back.state_dict[k], v) for k, v in weights.items())


# ---------------------------------------------------------------- every size: keys and shapes
@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_every_size_maps_keys_and_shapes_onto_timm(size):
    with torch.device("meta"):
        fcmae = build_fcmae(size)
        dense = timm.create_model(f"convnextv2_{size}", num_classes=10)
    expected = {k: tuple(v.shape) for k, v in dense.state_dict().items() if not k.startswith("head.")}
    for source in ("fcmae", "reference-fcmae"):
        state = {"model": fcmae.state_dict(), "optimizer": {}, "epoch": 1, "config": {"size": size}}
        if source == "reference-fcmae":
            state = reference_checkpoint(conversion_lib.to_timm(fcmae.state_dict()), decoder_from=fcmae.state_dict())
        conversion = conversion_lib.convert(state, size=size)
        assert conversion.source_format == source
        assert conversion.size == size and conversion.conv_mlp == (size in TIMM_CONV_MLP_SIZES)
        assert {k: tuple(v.shape) for k, v in conversion.state_dict.items()} == expected
        assert {k.split(".")[0] for k in conversion.dropped} == {"proj", "mask_token", "decoder", "pred"}
    # strict load (head aside) on the meta device
    result = dense.load_state_dict(conversion.state_dict, strict=False, assign=True)
    assert result.unexpected_keys == [] and all(k.startswith("head.") for k in result.missing_keys)


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("conv_mlp", [False, True])
def test_converted_weights_give_the_sparse_encoders_features(conv_mlp):
    fcmae = random_fcmae(seed=5)
    weights = conversion_lib.to_timm(fcmae.state_dict(), conv_mlp=conv_mlp)
    dense = conversion_lib.build_dense(TINY_DEPTHS, TINY_DIMS, conv_mlp, num_classes=7).eval()
    result = dense.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    imgs = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = fcmae.encoder(imgs, torch.zeros(3, 6))  # mask ratio 0
        got = dense.forward_features(imgs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_input_gives_the_same_features_as_the_project_checkpoint():
    fcmae = random_fcmae(seed=6)
    ref = reference_checkpoint(conversion_lib.to_timm(fcmae.state_dict()), decoder_from=fcmae.state_dict())
    conversion = conversion_lib.convert(ref)
    assert conversion_lib.verify(conversion) < 1e-4


def test_atto_with_random_weights_matches_timm_and_loads_through_pretrained_cfg(tmp_path):
    encoder = randomize_(sparse.build_encoder("atto"), 7).eval()
    path = tmp_path / "atto.pth"
    assert cv.run(cv.parse_args([_save(tmp_path, encoder.state_dict(), "enc.pth"), str(path), "--no-verify"])) == 0
    model = timm.create_model("convnextv2_atto", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=0)).eval()
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), encoder(imgs), rtol=1e-5, atol=1e-5)


def _save(tmp_path, obj, name):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------- the command and bad input
def test_command_writes_reference_format_and_reports_dropped_keys(tmp_path, capsys):
    fcmae = random_fcmae(seed=8)
    src = _save(tmp_path, {"model": fcmae.state_dict(), "optimizer": {}, "epoch": 2, "config": {}}, "ck.pth")
    out = tmp_path / "ref.pth"
    with pytest.raises(SystemExit) as exit_info:
        cv.main([src, str(out), "--format", "reference", "--verify"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "fcmae weights" in text and "max |diff|" in text
    assert "dropped  15 key(s)" in text and "used only in pre-training" in text
    written = torch.load(out, weights_only=True)
    assert set(written) == {"model"} and "stages.0.0.grn.gamma" in written["model"]
    back = conversion_lib.convert(written)
    assert all(torch.equal(back.state_dict[k], v) for k, v in conversion_lib.to_timm(fcmae.state_dict()).items())


@pytest.mark.slow
def test_launcher_takes_paths_relative_to_the_callers_directory(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.save({"model": random_fcmae(seed=10).state_dict()}, tmp_path / "in.pth")
    script = Path(__file__).resolve().parents[2] / "launch" / "convert.sh"
    result = subprocess.run(["bash", str(script), "in.pth", "out.pth", "--no-verify"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote    out.pth" in result.stdout and (tmp_path / "out.pth").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found"),
    ("truncated", "truncated or not a PyTorch checkpoint"),
    ("text", "not a PyTorch checkpoint"),
    ("foreign", "unrecognised weights"),
    ("incomplete", "missing"),
    ("size", "size mismatch"),
])
def test_refused_inputs_are_clear_errors_and_leave_no_output(tmp_path, capsys, case, message):
    fcmae = random_fcmae(seed=9)
    src = tmp_path / "in.pth"
    if case in ("truncated", "size"):
        torch.save({"model": fcmae.state_dict()}, src)
        if case == "truncated":
            src.write_bytes(src.read_bytes()[:2000])
    elif case == "text":
        src.write_text("not a checkpoint\n")
    elif case == "foreign":
        torch.save({"model": {"layer1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}}, src)
    elif case == "incomplete":
        state = fcmae.state_dict()
        del state["encoder.stages.1.blocks.1.mlp.fc2.weight"]
        torch.save(state, src)
    out = tmp_path / "out.pth"
    argv = [str(src), str(out)] + (["--size", "atto"] if case == "size" else [])
    with pytest.raises(SystemExit) as exit_info:
        cv.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_format_error_names_what_was_found():
    with pytest.raises(layouts.ConversionError, match=r"Found 2 keys, e\.g\. backbone\.conv\.weight"):
        conversion_lib.convert({"backbone.conv.weight": torch.zeros(1), "backbone.fc.bias": torch.zeros(1)})
    with pytest.raises(layouts.ConversionError, match="found a list"):
        conversion_lib.convert([1, 2])
