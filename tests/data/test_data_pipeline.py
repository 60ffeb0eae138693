"""The pre-training crop pipeline: same crops as torchvision, reduced-size JPEG decoding, the GPU path."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fcmae.data.crops import dct_scale, sample_crop
from fcmae.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataError, ImageFolderDataset, collate_images, sample_seed
from fcmae.data.gpu_decode import EncodedBatch, EncodedImage, GpuJpegDecoder, resolve_decode
from fcmae.data.image_io import read_info


def photo(width, height, seed=0) -> Image.Image:
    """A smooth random photograph-like image (JPEG-friendly, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return small.resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    for i in range(3):
        photo(1280, 960, seed=i).save(root / f"{i}.jpg", quality=95)
    return root


def torchvision_draw(image, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    box = transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
    return tuple(int(v) for v in box), bool(torch.rand(1) < 0.5)


def test_crop_boxes_and_flips_are_torchvision_draws():
    for width, height in ((2000, 1500), (500, 375), (64, 300)):
        image = Image.new("RGB", (width, height))
        for seed in range(50):
            torch.manual_seed(seed)
            expected = torchvision_draw(image)
            torch.manual_seed(seed)
            assert sample_crop(height, width) == expected


def test_dataset_draws_its_boxes_before_decoding_as_torchvision_would(big_jpegs):
    ds = ImageFolderDataset(big_jpegs, input_size=64, seed=3)
    ds.set_epoch(2)
    image = Image.open(big_jpegs / "0.jpg")
    scales = set()
    for index in range(50):
        torch.manual_seed(sample_seed(3, 2, index))
        expected = torchvision_draw(image)
        box, flip = ds.sample_crop(960, 1280, index)
        assert (box, flip) == expected
        scales.add(dct_scale(box[2], box[3], 64, 64))
    assert len(scales) >= 2 and max(scales) > 1  # the boxes are the same whatever size the decoder then reads


def test_dct_scale_keeps_the_crop_at_least_the_output_size():
    assert dct_scale(447, 1000, 224, 224) == 1
    assert dct_scale(448, 1000, 224, 224) == 2
    assert dct_scale(1792, 1800, 224, 224) == 8
    assert dct_scale(1791, 1800, 224, 224) == 4


def baseline(size, seed, epoch, index, path):
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(sample_seed(seed, epoch, index))
    return tf(Image.open(path).convert("RGB"))


def to_unit(x):
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_fast_jpeg_crops_are_close_to_the_full_decode(big_jpegs):
    ds = ImageFolderDataset(big_jpegs, input_size=64, seed=1)
    for index in range(12):
        ours, bad = ds[index]
        assert not bad
        expected = baseline(64, 1, 0, index, ds.files[index % len(ds)])
        diff = (to_unit(ours) - to_unit(expected)).abs()
        assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1, index


def test_decode_planning_and_errors(tmp_path, big_jpegs):
    infos = [read_info(p) for p in sorted(big_jpegs.iterdir())]
    assert resolve_decode("auto", infos, 3, "uint8", cuda=False) == "cpu"
    assert resolve_decode("auto", infos, 3, "uint8", cuda=True) == "gpu"
    assert resolve_decode("cpu", infos, 3, "uint8", cuda=True) == "cpu"
    with pytest.raises(DataError, match="decode 'gpu' needs a CUDA device"):
        resolve_decode("gpu", infos, 3, "uint8", cuda=False)
    with pytest.raises(DataError, match="unknown decode 'nvjpeg'"):
        resolve_decode("nvjpeg", infos, 3, "uint8", cuda=True)
    photo(64, 48).save(tmp_path / "x.png")
    png = infos + [read_info(tmp_path / "x.png")]
    assert resolve_decode("auto", png, 3, "uint8", cuda=True) == "cpu"
    with pytest.raises(DataError, match=r"decodes JPEGs only, and .*x\.png is not one"):
        resolve_decode("gpu", png, 3, "uint8", cuda=True)
    with pytest.raises(DataError, match="in_chans=1 of uint16"):
        resolve_decode("gpu", infos, 1, "uint16", cuda=True)
    with pytest.raises(DataError, match="needs a CUDA device"):
        ImageFolderDataset(big_jpegs, input_size=64, decode="gpu", cuda=False)


def gpu_path_matches_cpu_path(root, device, check_files=1000):
    cpu = ImageFolderDataset(root, input_size=64, seed=5)
    gpu = ImageFolderDataset(root, input_size=64, seed=5, decode="gpu", cuda=True, check_files=check_files)
    items = [gpu[i] for i in range(len(gpu))]
    assert any(isinstance(x, EncodedImage) for x, _ in items)
    images, bad = collate_images(items)
    assert isinstance(images, EncodedBatch) and not bad
    out = gpu.to_device(images, device).cpu()
    expected = torch.stack([cpu[i][0] for i in range(len(cpu))])
    assert out.shape == expected.shape
    diff = (out - expected).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.15


def test_gpu_path_logic_on_cpu(tmp_path, big_jpegs):
    """The GPU path's steps, run with torchvision's CPU decoder; CMYK JPEGs, and the 8-bit PNG and .npy files
    that the header check did not reach, fall back to uint8 crops made on the CPU."""
    root = tmp_path / "mixed"
    root.mkdir()
    for p in sorted(big_jpegs.iterdir()):
        (root / p.name).write_bytes(p.read_bytes())
    photo(300, 200, seed=9).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    photo(300, 200, seed=10).save(root / "zz.png")
    np.save(root / "zz.npy", np.asarray(photo(300, 200, seed=11)))  # (H, W, 3) uint8
    gpu_path_matches_cpu_path(root, "cpu", check_files=1)  # one header checked: a JPEG
    # a corrupt file inside a batch: decoded one by one, replaced by another image, counted
    good = ImageFolderDataset(big_jpegs, input_size=64, seed=5, decode="gpu", cuda=True)
    items = [good[0][0], EncodedImage(torch.frombuffer(bytearray(b"\xff\xd8garbage"), dtype=torch.uint8),
                                      torch.tensor([0, 0, 10, 10, 0]))]
    decoder = GpuJpegDecoder(64, IMAGENET_MEAN, IMAGENET_STD, "cpu")
    with pytest.warns(UserWarning, match="1 image"):
        out = decoder(EncodedBatch.collate(items))
    assert out.shape == (2, 3, 64, 64) and decoder.failed == 1 and torch.equal(out[0], out[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_path_on_cuda_matches_cpu_path(big_jpegs):
    gpu_path_matches_cpu_path(big_jpegs, "cuda")


def test_bench_data_prints_a_line_per_pipeline_and_the_ratio(tmp_path, capsys):
    from fcmae.tools import bench_data

    bench_data.make_photos(tmp_path, 160, 120, 2)
    with pytest.raises(SystemExit) as exit_info:
        bench_data.main(["--data_path", str(tmp_path), "--input_size", "32", "--seconds", "0.1"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:3]] == ["fcmae-cpu", "torchvision"]
    rates = [float(line.split()[1]) for line in lines[1:3]]
    assert all(r > 0 for r in rates) and lines[-1].startswith("ratio ")
    assert float(lines[-1].split()[1]) == pytest.approx(rates[0] / rates[1], rel=0.05)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            bench_data.main(["--data_path", str(tmp_path), "--device", "cuda"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == "bench_data: error: --device cuda: no CUDA device is available"


@pytest.mark.parametrize("mode,in_chans", [("L", 1), ("RGB", 3)])
def test_pillow_crops_become_tensors_over_writable_arrays(tmp_path, monkeypatch, mode, in_chans):
    """torch warns (once per process) and leaves writes undefined for a tensor over a read-only array: every
    array the Pillow crop path hands to torch.from_numpy must be writable, one-channel crops included."""
    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 96, in_chans), dtype=np.uint8).squeeze(), mode).save(
            folder / f"{i}.png")
    seen = []
    real = torch.from_numpy

    def recording_from_numpy(array):
        seen.append(array.flags.writeable)
        return real(array)

    monkeypatch.setattr(torch, "from_numpy", recording_from_numpy)
    dataset = ImageFolderDataset(folder, input_size=32, in_chans=in_chans, mean=[0.5] * in_chans,
                                 std=[0.25] * in_chans)
    image, bad = dataset[0]
    assert image.shape == (in_chans, 32, 32) and not bad
    assert seen and all(seen), seen
