"""Domain images: 8/16-bit PNG, TIFF, .npy layouts, scaling, format checks, channel statistics."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data.folder import DataError, ImageFolderDataset, channel_stats
from fcmae.data.image_io import LAYOUTS, ImageFile, ImageFormatError, read_info


def write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) written by hand: Pillow cannot write colour 16-bit PNGs."""
    array = array if array.ndim == 3 else array[..., None]
    h, w, c = array.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def folder(tmp_path, name="d"):
    root = tmp_path / name
    root.mkdir()
    return root


def test_16bit_grey_png_is_scaled_not_white(tmp_path):
    """Issue 12 item 9: Pillow's convert('RGB') clipped mode I;16 to 255, so 16-bit images trained as white."""
    root = folder(tmp_path)
    values = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    Image.fromarray(values).save(root / "a.png")
    from torchvision import transforms

    with pytest.raises(DataError, match=r"a\.png has 1 channel\(s\) but the data set has in_chans=3"):
        ImageFolderDataset(root, transforms.ToTensor())  # the old code trained it as 3 white channels
    legacy = ImageFolderDataset(root, transforms.ToTensor(), in_chans=1)
    image, bad = legacy[0]
    assert not bad and image.shape == (1, 64, 64)
    assert float(image.max()) <= 4000 / 65535 + 1 / 255 and float(image.mean()) < 0.05
    ds = ImageFolderDataset(root, input_size=32, in_chans=1, mean=[0.0], std=[1.0])
    assert ds.dtype == "uint16" and ds.bit_depth == 16
    torch.testing.assert_close(ds.load_unit(0)[0], torch.from_numpy(values / 65535.0).float())
    x, _ = ds[0]
    assert x.shape == (1, 32, 32) and 0 <= float(x.mean()) < 0.07


def read_unit(info, in_chans):
    """The whole image of `info`, its file opened again with the layout its header was read with."""
    with ImageFile(info.path, info.layout if info.layout in LAYOUTS else "auto", info.channels) as image:
        return image.read_unit(in_chans)


def test_16bit_colour_png_tiff_and_npy_layouts(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    expected = torch.from_numpy(hwc.transpose(2, 0, 1) / 65535.0).float()
    import tifffile

    write_png16(tmp_path / "a.png", hwc)
    tifffile.imwrite(tmp_path / "b.tif", hwc, photometric="rgb")
    tifffile.imwrite(tmp_path / "c.tif", np.ascontiguousarray(hwc.transpose(2, 0, 1)), photometric="minisblack")
    np.save(tmp_path / "d.npy", hwc)
    np.save(tmp_path / "e.npy", np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    for name, layout in (("a.png", ""), ("b.tif", "HWC"), ("c.tif", "CHW"), ("d.npy", "HWC"), ("e.npy", "CHW")):
        info = read_info(tmp_path / name, in_chans=3)
        assert (info.height, info.width, info.channels, info.dtype) == (40, 50, 3, "uint16"), name
        assert info.layout == layout, name
        torch.testing.assert_close(read_unit(info, 3), expected, msg=name)
    # an explicit layout wins over the in_chans rule; 2-D arrays are 1 channel; floats are kept as they are
    assert read_info(tmp_path / "e.npy", layout="HWC", in_chans=3).channels == 50
    np.save(tmp_path / "f.npy", np.full((8, 9), 2.5, np.float32))
    info = read_info(tmp_path / "f.npy", in_chans=1)
    assert info.channels == 1 and float(read_unit(info, 1).max()) == 2.5


def test_npy_layout_is_never_guessed_and_rank_is_checked(tmp_path):
    np.save(tmp_path / "square.npy", np.zeros((4, 10, 4), np.uint8))
    with pytest.raises(ImageFormatError, match=r"square\.npy: cannot tell .*both its first and last axes are 4"):
        read_info(tmp_path / "square.npy", in_chans=4)
    assert read_info(tmp_path / "square.npy", layout="CHW", in_chans=4).layout == "CHW"
    with pytest.raises(ImageFormatError, match="neither its first nor its last axis is in_chans=3"):
        read_info(tmp_path / "square.npy", in_chans=3)
    root = folder(tmp_path)
    np.save(root / "rank4.npy", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"rank4\.npy: an image array must have 2 dimensions .*shape \(2, 3, 8, 8\)"):
        ImageFolderDataset(root, input_size=8, in_chans=3)


def test_mixed_folders_are_errors_naming_the_file(tmp_path):
    root = folder(tmp_path, "chans")
    np.save(root / "a.npy", np.zeros((4, 16, 16), np.uint16))
    np.save(root / "b.npy", np.zeros((3, 16, 16), np.uint16))
    with pytest.raises(DataError, match=r"b\.npy: .*neither its first nor its last axis is in_chans=4"):
        ImageFolderDataset(root, input_size=16, in_chans=4, mean=[0] * 4, std=[1] * 4)
    root = folder(tmp_path, "tiffchans")
    import tifffile

    tifffile.imwrite(root / "a.tif", np.zeros((16, 16), np.uint16))
    tifffile.imwrite(root / "b.tif", np.zeros((16, 16, 3), np.uint16), photometric="rgb")
    with pytest.raises(DataError, match=r"b\.tif has 3 channel\(s\) but the data set has in_chans=1"):
        ImageFolderDataset(root, input_size=16, in_chans=1, mean=[0], std=[1])
    root = folder(tmp_path, "depths")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(root / "b.png")
    with pytest.raises(DataError, match=r"b\.png has samples of uint16 \(16-bit\) but the data set's are uint8"):
        ImageFolderDataset(root, input_size=16, in_chans=1, mean=[0], std=[1])


def test_photographs_convert_to_rgb_and_bad_files_are_skipped(tmp_path):
    """The ImageNet convention: grey, palette and CMYK JPEGs load as RGB in a 3-channel 8-bit set."""
    root = folder(tmp_path)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    rgb.save(root / "a.jpg")
    rgb.convert("L").save(root / "b.jpg")
    rgb.convert("CMYK").save(root / "c.jpg")
    rgb.convert("P").save(root / "d.png")
    (root / "e.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(root, input_size=32)
    assert (ds.in_chans, ds.dtype, ds.decode) == (3, "uint8", "cpu")
    for i in range(4):
        x, bad = ds[i]
        assert x.shape == (3, 32, 32) and not bad
    x, bad = ds[4]
    assert x.shape == (3, 32, 32) and len(bad) == 1 and bad[0][0].endswith("e.jpg")
    # a mismatched file met during training (not among the checked headers) is skipped, with the reason
    root = folder(tmp_path, "late")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(root / "b.png")
    ds = ImageFolderDataset(root, input_size=16, in_chans=1, mean=[0], std=[1], check_files=1)
    x, bad = ds[1]
    assert x.shape == (1, 16, 16) and bad[0][0].endswith("b.png") and "uint16 (16-bit)" in bad[0][1]


def test_mean_std_validation_and_auto_statistics(tmp_path):
    root = folder(tmp_path)
    for i in range(5):
        chans = np.stack([np.full((8, 8), 0.1 * i, np.float32), np.full((8, 8), 0.5, np.float32),
                          np.full((8, 8), i % 2, np.float32), np.full((8, 8), 2.0, np.float32)])
        np.save(root / f"{i}.npy", chans)
    with pytest.raises(DataError, match="mean has 3 value.* in_chans=4"):
        ImageFolderDataset(root, input_size=8, in_chans=4, mean=[0.5] * 3, std=[1] * 4)
    with pytest.raises(DataError, match="std values must be finite and positive"):
        ImageFolderDataset(root, input_size=8, in_chans=4, mean=[0.5] * 4, std=[1, 1, 0, 1])
    logs = []
    ds = ImageFolderDataset(root, input_size=8, in_chans=4, logger=logs.append)  # None -> auto for 4 channels
    values = np.array([[0.1 * i, 0.5, i % 2, 2.0] for i in range(5)])
    np.testing.assert_allclose(ds.mean, values.mean(0), atol=1e-6)
    np.testing.assert_allclose(ds.std[:3], values.std(0)[:3], atol=1e-5)
    assert ds.std[3] == pytest.approx(1e-6) and any("channel statistics" in m for m in logs)
    again = channel_stats(ds, max_images=3, seed=1, logger=None)
    assert again == channel_stats(ds, max_images=3, seed=1, logger=None)  # deterministic sample
    x, _ = ds[0]
    expected = torch.full((8, 8), (0.0 - ds.mean[0]) / ds.std[0])  # file 0 has 0 in channel 0
    torch.testing.assert_close(x[0], expected, atol=1e-4, rtol=0)


def test_four_channel_8bit_png_keeps_its_channels_as_stored(tmp_path):
    """RGBA as 4 data channels: no alpha premultiplication (Pillow's RGBA resize would apply it)."""
    root = folder(tmp_path)
    pixels = np.zeros((40, 60, 4), np.uint8)
    pixels[...] = (200, 100, 50, 10)
    Image.fromarray(pixels, "RGBA").save(root / "a.png")
    ds = ImageFolderDataset(root, input_size=16, in_chans=4, mean=[0] * 4, std=[1] * 4)
    x, bad = ds[0]
    assert not bad and x.shape == (4, 16, 16)
    torch.testing.assert_close(x, torch.tensor([200, 100, 50, 10]).div(255).view(4, 1, 1).expand(4, 16, 16),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt, in_chans, dtype", [("png16", 1, "uint16"), ("npy4", 4, "uint16")])
def test_domain_demo_folders(tmp_path, fmt, in_chans, dtype):
    from fcmae.data.demo import demo_pretrain_folder

    root = demo_pretrain_folder(tmp_path, crop_size=32, per_photo=1, fmt=fmt) / "train"
    ds = ImageFolderDataset(root, input_size=32, in_chans=in_chans, logger=None)
    assert (ds.in_chans, ds.dtype, len(ds.mean)) == (in_chans, dtype, in_chans)
    unit = ds.load_unit(0)
    assert unit.shape == (in_chans, 32, 32) and float(unit.max()) > 0.3  # the full 16-bit range is used


def test_fixed_batch_for_the_reconstruction_picture(tmp_path):
    root = folder(tmp_path)
    for i in range(3):
        np.save(root / f"{i}.npy", np.full((2, 30, 50), 0.25 * (i + 1), np.float32))
    (root / "3.npy").write_bytes(b"broken")
    ds = ImageFolderDataset(root, input_size=16, in_chans=2, mean=[0.5, 0.5], std=[0.25, 0.25], check_files=3)
    batch = ds.fixed_batch(4)  # the broken file is left out
    assert batch.shape == (3, 2, 16, 16)
    torch.testing.assert_close(batch[:, 0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))


def test_every_reader_skips_the_same_unreadable_files(tmp_path):
    """One list of 'unreadable' errors (image_io.UNREADABLE_IMAGE_ERRORS) for training, the header check, the
    channel statistics and the reconstruction picture: a truncated 16-bit PNG (torchvision raises RuntimeError)
    stopped the statistics and the picture, a corrupt TIFF header (tifffile raises a ValueError) the header check."""
    import tifffile

    root = folder(tmp_path)
    values = np.random.default_rng(0).integers(0, 65536, (24, 32), dtype=np.uint16)
    Image.fromarray(values).save(root / "a.png")
    data = (root / "a.png").read_bytes()
    (root / "b.png").write_bytes(data[:len(data) // 2])  # header intact, pixels cut off
    tifffile.imwrite(tmp_path / "c.tif", values)
    (root / "c.tif").write_bytes((tmp_path / "c.tif").read_bytes()[:100])  # IFD cut off
    logs = []
    ds = ImageFolderDataset(root, input_size=16, in_chans=1, mean="auto", std="auto", logger=logs.append)
    assert "channel statistics from 1 images" in logs[-1]
    np.testing.assert_allclose(ds.mean, [(values / 65535.0).mean()], atol=1e-5)
    assert ds.fixed_batch(3).shape == (1, 1, 16, 16)
    for index, name, error in ((1, "b.png", "RuntimeError"), (2, "c.tif", "TiffFileError")):
        x, bad = ds[index]
        assert x.shape == (1, 16, 16) and bad[0][0].endswith(name) and bad[0][1].startswith(error)


def corrupt_tiff(raw: bytes, how: str) -> bytes:
    """A little-endian TIFF with one header field broken, found by parsing (not by fixed byte positions)."""
    data = bytearray(raw)
    if how == "no pages":
        data[4:8] = bytes(4)  # the first IFD's offset: 0
        return bytes(data)
    ifd = int.from_bytes(data[4:8], "little")
    entries = [ifd + 2 + 12 * i for i in range(int.from_bytes(data[ifd:ifd + 2], "little"))]
    width = next(e for e in entries if int.from_bytes(data[e:e + 2], "little") == 256)  # the ImageWidth tag
    if how == "no width":
        data[width:width + 2] = (0x1FF).to_bytes(2, "little")  # an unknown tag instead
    elif how == "empty width":
        data[width + 4:width + 8] = bytes(4)  # a value count of 0
    elif how == "huge width":
        data[width + 11] = 0xFF  # the value's high byte
    return bytes(data)


@pytest.mark.parametrize("how", ["no pages", "no width", "empty width", "huge width"])
def test_a_corrupt_tiff_is_skipped_like_any_unreadable_image(tmp_path, how):
    """tifffile meets corrupt headers with IndexError, ZeroDivisionError, TypeError or MemoryError; each is an
    OSError naming the file, so training skips it instead of stopping."""
    import tifffile

    from fcmae.data.image_io import ImageFile

    root = folder(tmp_path)
    values = np.random.default_rng(0).integers(0, 65536, (24, 32), dtype=np.uint16)
    tifffile.imwrite(root / "a.tif", values)
    (root / "b.tif").write_bytes(corrupt_tiff((root / "a.tif").read_bytes(), how))
    with pytest.raises(OSError, match="b.tif"):
        with ImageFile(root / "b.tif", in_chans=1) as image:
            image.read(1, (0, 0, 16, 16))
    ds = ImageFolderDataset(root, input_size=16, in_chans=1, mean=[0.5], std=[0.5], logger=lambda line: None)
    x, bad = ds[1]
    assert x.shape == (1, 16, 16) and len(bad) == 1 and bad[0][0].endswith("b.tif")
