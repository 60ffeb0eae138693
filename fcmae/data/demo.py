"""Built-in demo data: real photographs bundled with scikit-image, no network.

scikit-image ships a few dozen sample images inside its package
(skimage/data). The natural photographs among them are scaled so their
shorter side is `short_side` pixels and cut into random square crops, which
are written once as an image folder in a cache directory:
    <cache>/<name>/train/<photo>/<photo>_000.jpg ...
    <cache>/<name>/val/<photo>/<photo>_000.jpg ...     (when val_per_photo > 0)

`fmt` picks the file kind: 'jpg' (RGB, the default), 'png16' (1-channel
16-bit PNG: the grey photograph times 257, so the full 16-bit range is
used) or 'npy4' (4-channel uint16 (C, H, W) .npy: R, G, B and grey, times
257) -- small stand-ins for microscopy or satellite data in tests.

One sub-folder per source photograph, so the same folder serves as an
unlabelled set for pre-training and as a labelled set (one class per
photograph) for fine-tuning. Train and val crops are drawn independently
from the same photograph, so they may overlap: it is a demo, not a benchmark.

The folder is built in a temporary directory and renamed into place, so a
crash never leaves a half-written set behind and concurrent builders (e.g.
several DDP ranks) are safe. The cache is `$FCMAE_CACHE`, else
`$XDG_CACHE_HOME/fcmae`, else `~/.cache/fcmae`.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]

# Natural photographs in skimage/data (synthetic images, drawings, tiny
# images and the right frame of the motorcycle stereo pair are left out).
DEMO_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)
_FORMAT_VERSION = 1
DEMO_FORMATS = ("jpg", "png16", "npy4")
_DONE_MARKER = ".complete"


def skimage_data_dir() -> Path:
    try:
        import skimage  # only the built-in demo needs it, and it is slow to import
    except ImportError:
        raise RuntimeError("the demo data needs scikit-image (pip install scikit-image)") from None
    return Path(skimage.__file__).parent / "data"


def demo_photos() -> List[Tuple[str, Image.Image]]:
    """(name, RGB PIL image) for each bundled photograph found in the installed scikit-image."""
    data_dir = skimage_data_dir()
    photos = []
    for filename in DEMO_PHOTOS:
        path = data_dir / filename
        if path.is_file():
            with Image.open(path) as im:
                photos.append((path.stem, im.convert("RGB")))
    if len(photos) < 2:
        raise RuntimeError(f"found only {len(photos)} demo photographs in {data_dir}; is scikit-image complete?")
    return photos


def default_cache_dir() -> Path:
    if os.environ.get("FCMAE_CACHE"):
        return Path(os.environ["FCMAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fcmae"


def _random_crops(image: Image.Image, count: int, crop_size: int, short_side: int, rng: np.random.RandomState):
    w, h = image.size
    scale = short_side / min(w, h)
    image = image.resize((max(crop_size, round(w * scale)), max(crop_size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    for _ in range(count):
        x = int(rng.randint(0, w - crop_size + 1))
        y = int(rng.randint(0, h - crop_size + 1))
        yield image.crop((x, y, x + crop_size, y + crop_size))


def _save(crop: Image.Image, stem: Path, fmt: str) -> None:
    if fmt == "jpg":
        crop.save(stem.with_suffix(".jpg"), quality=95)
    elif fmt == "png16":
        Image.fromarray(np.asarray(crop.convert("L")).astype(np.uint16) * 257).save(stem.with_suffix(".png"))
    else:
        rgb = np.asarray(crop).transpose(2, 0, 1)
        channels = np.concatenate([rgb, np.asarray(crop.convert("L"))[None]]).astype(np.uint16) * 257
        np.save(stem.with_suffix(".npy"), channels)


def build_demo_folder(
    cache_dir: Optional[PathLike] = None,
    crop_size: int = 128,
    train_per_photo: int = 32,
    val_per_photo: int = 0,
    short_side: int = 256,
    seed: int = 0,
    fmt: str = "jpg",
) -> Path:
    """Build (once) and return the root of a demo image folder (see the module docstring)."""
    if crop_size > short_side:
        raise ValueError(f"crop_size ({crop_size}) must not exceed short_side ({short_side})")
    if fmt not in DEMO_FORMATS:
        raise ValueError(f"unknown demo format {fmt!r}; choose one of: {', '.join(DEMO_FORMATS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = (f"skimage-photos-v{_FORMAT_VERSION}-c{crop_size}-s{short_side}-t{train_per_photo}-v{val_per_photo}"
            f"-seed{seed}")
    name += "" if fmt == "jpg" else f"-{fmt}"
    root = cache_dir / name
    if (root / _DONE_MARKER).is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        rng = np.random.RandomState(seed)
        for photo_name, image in demo_photos():
            for split, count in (("train", train_per_photo), ("val", val_per_photo)):
                if count <= 0:
                    continue
                out = tmp / split / photo_name
                out.mkdir(parents=True)
                for i, crop in enumerate(_random_crops(image, count, crop_size, short_side, rng)):
                    _save(crop, out / f"{photo_name}_{i:03d}", fmt)
        (tmp / _DONE_MARKER).write_text("complete\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / _DONE_MARKER).is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def demo_pretrain_folder(cache_dir: Optional[PathLike] = None, crop_size: int = 128, per_photo: int = 32,
                         fmt: str = "jpg") -> Path:
    """Unlabelled demo set for pre-training: the returned root has train/."""
    return build_demo_folder(cache_dir, crop_size=crop_size, train_per_photo=per_photo, fmt=fmt)


def demo_classification_folder(
    cache_dir: Optional[PathLike] = None, crop_size: int = 128, train_per_photo: int = 32, val_per_photo: int = 8,
    fmt: str = "jpg",
) -> Path:
    """Labelled demo set for fine-tuning: train/ and val/, one class per photograph."""
    return build_demo_folder(cache_dir, crop_size=crop_size, train_per_photo=train_per_photo,
                             val_per_photo=val_per_photo, fmt=fmt)
