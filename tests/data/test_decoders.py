"""fcmae.data.decoders: TorchCodec where it imports, torchvision's deprecated decoders as the fallback.

Each backend is forced by setting `decoders.DECODER`; a backend this environment lacks is skipped, saying why.
"""

import io
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fcmae.data import decoders
from fcmae.data.gpu_decode import EncodedBatch, GpuJpegDecoder
from fcmae.data.image_io import UNREADABLE_IMAGE_ERRORS, ImageFile
from fcmae.tools import env
from tests.data.test_data_formats import write_png16

BACKENDS = ("torchcodec", "torchvision")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def use_backend(monkeypatch, name: str) -> None:
    available = decoders.codec is not None if name == "torchcodec" else decoders.decode_png is not None
    if not available:
        pytest.skip(f"{name} cannot decode images here ({decoders.CODEC_PROBLEM or 'torchvision without io'})")
    monkeypatch.setattr(decoders, "DECODER", name)
    if name == "torchvision":  # the fallback is deprecated, and known to be: its warning is expected here
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)


def decode_with(monkeypatch, name: str, fn, *args):
    """fn(*args) with backend `name` forced, the backend restored afterwards."""
    with monkeypatch.context() as patch:
        use_backend(patch, name)
        return fn(*args)


def jpeg_bytes(mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A smooth photograph-like JPEG of odd size (partial blocks and chroma edges), saved with `save` options."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((53, 37), Image.BICUBIC)
    out = io.BytesIO()
    image.convert(mode).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


JPEGS = [jpeg_bytes(), jpeg_bytes(seed=1, subsampling=0), jpeg_bytes(seed=2, subsampling=1),
         jpeg_bytes("L", seed=3), jpeg_bytes(seed=4, progressive=True), jpeg_bytes("CMYK", seed=5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_reads_as_stored_from_a_file_and_from_bytes(tmp_path, monkeypatch, backend, channels):
    """Grey, grey+alpha, RGB, RGBA: each backend gives the written samples bit for bit (so both give the same)."""
    use_backend(monkeypatch, backend)
    hwc = np.random.default_rng(channels).integers(0, 65536, (9, 13, channels), dtype=np.uint16)
    hwc[0, 0], hwc[-1, -1] = 0, 65535
    write_png16(tmp_path / "a.png", hwc)
    expected = hwc.transpose(2, 0, 1)
    with ImageFile(tmp_path / "a.png") as image:
        assert image.info.kind == "png16" and image.info.channels == channels
        from_file = image.read(channels)
    with ImageFile("shard.tar:a.png", data=(tmp_path / "a.png").read_bytes()) as image:
        from_bytes = image.read(channels, (2, 3, 4, 5))
    assert from_file.dtype == np.uint16 and np.array_equal(from_file, expected)
    assert from_bytes.dtype == np.uint16 and np.array_equal(from_bytes, expected[:, 2:6, 3:8])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncated_16bit_png_is_unreadable_through_either_backend(tmp_path, monkeypatch, backend):
    use_backend(monkeypatch, backend)
    write_png16(tmp_path / "a.png", np.zeros((20, 20, 3), dtype=np.uint16))
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes()[:-30])
    with ImageFile(tmp_path / "b.png") as image, pytest.raises(UNREADABLE_IMAGE_ERRORS):
        image.read(3)


def test_both_backends_decode_jpegs_on_the_cpu_to_the_same_pixels(monkeypatch):
    """4:2:0, 4:4:4, 4:2:2, grey, progressive and CMYK JPEGs, as one batch, as RGB."""
    batch = [as_tensor(data) for data in JPEGS]
    codec, vision = (decode_with(monkeypatch, name, decoders.decode_jpegs, batch, torch.device("cpu"))
                     for name in BACKENDS)
    assert len(codec) == len(vision) == len(JPEGS)
    for a, b in zip(codec, vision):
        assert a.shape == (3, 37, 53) and a.dtype == torch.uint8 and torch.equal(a, b)
    with Image.open(io.BytesIO(JPEGS[0])) as image:  # and they are the JPEG's pixels: Pillow's within rounding
        pillow = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert (codec[0].int() - pillow.int()).abs().max() <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_jpeg_decoder_runs_on_the_cpu_through_each_backend(monkeypatch, backend):
    """GpuJpegDecoder calls the chosen library (a spy counts), with one batched call, and its output is the same
    through either; a corrupt JPEG in the batch is replaced by another image, as before."""
    use_backend(monkeypatch, backend)
    owner, name = (decoders.codec, "decode_jpeg") if backend == "torchcodec" else (decoders, "decode_jpeg")
    real, calls = getattr(owner, name), []
    monkeypatch.setattr(owner, name, lambda source, **kw: calls.append(len(source)) or real(source, **kw))
    boxes = torch.tensor([[0, 0, 37, 53, 0], [5, 7, 20, 30, 1], [1, 2, 30, 40, 0]])
    batch = EncodedBatch([as_tensor(JPEGS[i]) for i in range(3)], boxes, [None] * 3)
    decoder = GpuJpegDecoder(16, MEAN, STD, "cpu")
    out = decoder(batch)
    assert calls == [3] and out.shape == (3, 3, 16, 16) and decoder.failed == 0
    other = decode_with(monkeypatch, BACKENDS[1 - BACKENDS.index(backend)], decoder, batch)
    assert torch.equal(out, other)
    corrupt = EncodedBatch([batch.data[0], as_tensor(b"\xff\xd8garbage")], boxes[:2], [None] * 2)
    with pytest.warns(UserWarning, match="1 image"):
        replaced = decoder(corrupt)
    assert decoder.failed == 1 and torch.equal(replaced[0], out[0]) and torch.equal(replaced[1], out[0])


def test_env_reports_the_decoder(monkeypatch):
    report = dict(env.collect())
    assert report["image decoder"].startswith(decoders.DECODER + " ")
    monkeypatch.setattr(decoders, "DECODER", "torchvision")
    line = dict(env.collect())["image decoder"]
    assert line.startswith(f"torchvision {torchvision.__version__} (TorchCodec not importable")
    assert "fcmae[codec]" in line


def test_without_any_decoder_a_16bit_png_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setattr(decoders, "DECODER", "none")
    monkeypatch.setattr(decoders, "CODEC_PROBLEM", "ModuleNotFoundError: No module named 'torchcodec'")
    write_png16(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint16))
    with ImageFile(tmp_path / "a.png") as image, pytest.raises(ImportError, match=r"pip install 'fcmae\[codec\]'"):
        image.read(1)
    with pytest.raises(ImportError, match="decode 'gpu' needs TorchCodec"):
        decoders.decode_jpegs([as_tensor(JPEGS[0])], torch.device("cpu"))


def decode_everything(tmp_path) -> None:
    write_png16(tmp_path / "a.png", np.ones((8, 8, 3), dtype=np.uint16))
    with ImageFile(tmp_path / "a.png") as image:
        image.read(3)
    batch = EncodedBatch([as_tensor(JPEGS[0])], torch.tensor([[0, 0, 37, 53, 0]]), [None])
    GpuJpegDecoder(16, MEAN, STD, "cpu")(batch)


def test_decoding_through_torchcodec_emits_no_deprecation_warning(tmp_path, monkeypatch):
    """torchvision >= 0.29 warns on each decode; with TorchCodec nothing should. The same steps through the
    fallback do warn there (so the check below can see a warning)."""
    use_backend(monkeypatch, "torchcodec")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning)
        decode_everything(tmp_path)
    if decoders.decode_png is not None and tuple(int(v) for v in torchvision.__version__.split(".")[:2]) >= (0, 29):
        monkeypatch.setattr(decoders, "DECODER", "torchvision")
        with pytest.warns(DeprecationWarning, match="TorchCodec"):
            decode_everything(tmp_path)
