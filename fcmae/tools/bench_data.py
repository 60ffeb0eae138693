"""Data-loading benchmark: images/s per process of the pre-training pipeline against torchvision's.

    python -m fcmae.tools.bench_data --data_path D [--input_size 224] [--seconds 20] [--device cuda]
    python -m fcmae.tools.bench_data --make_photos D --photo_size 2000x1500 --count 64   # test photographs

Pipelines, measured side by side in one process with one thread,
alternating short rounds so that a shared machine's load hits both alike:

- `fcmae-cpu`: fcmae.data.folder.ImageFolderDataset (crop box drawn from the header,
  reduced-size JPEG decoding, crop + bicubic resize, flip, normalise).
- with `--shards SPEC` (the same images as WebDataset shards, e.g. made by
  `fcmae-make-shards D OUT`): `fcmae-shards`, the same augmentation on the
  shard stream (fcmae.data.shard_sets.ShardImages: tar reading, the sample
  shuffle, decoding), as one loader worker runs it.
- `torchvision`: ImageFolder + RandomResizedCrop(S, (0.2, 1), bicubic) +
  RandomHorizontalFlip + ToTensor + Normalize (the baseline).
- with `--device cuda`: `fcmae-gpu-worker` (what a loader worker does with
  decode='gpu': header, box, file bytes) and `fcmae-gpu-device` (batched
  nvJPEG decode + crop/resize/flip/normalise on the GPU, per GPU).

Prints one line per pipeline, `<name>: <N> img/s`, and last `ratio <x>`
(fcmae-cpu / torchvision).
"""

import argparse
import os
import time
from pathlib import Path
from typing import Callable, List

import torch
from PIL import Image
from torchvision import datasets, transforms

from fcmae.data.demo import demo_photos
from fcmae.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageFolderDataset,
    collate_images,
    find_image_root,
)
from fcmae.data.shard_sets import ShardImages
from fcmae.data.shards import find_shards
from fcmae.runtime.command import run_cli


def make_photos(folder, width: int, height: int, count: int, quality: int = 90) -> Path:
    """Write `count` JPEG photographs of width x height, upscaled from scikit-image's bundled photos."""

    out = Path(folder) / "train" / "photos"
    out.mkdir(parents=True, exist_ok=True)
    photos = demo_photos()
    for i in range(count):
        name, image = photos[i % len(photos)]
        w, h = image.size
        s = max(width / w, height / h)  # cover, then centre-crop to the exact size
        big = image.resize((round(w * s) + 1, round(h * s) + 1), Image.BICUBIC)
        left, top = (big.width - width) // 2, (big.height - height) // 2
        big = big.crop((left, top, left + width, top + height))
        if i // len(photos) % 2:
            big = big.transpose(Image.FLIP_LEFT_RIGHT)  # later copies differ from the first
        big.save(out / f"{name}_{i:04d}.jpg", quality=quality)
    return out.parent


def baseline_dataset(root, input_size: int):
    return datasets.ImageFolder(str(root), transform=transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))


def measure(pipelines: List[Callable[[int], int]], seconds: float, round_s: float = 0.5) -> List[float]:
    """Alternate rounds of each pipeline (fn(i) -> images done) until each ran `seconds`; images/s of each."""
    done = [0] * len(pipelines)
    spent = [0.0] * len(pipelines)
    i = 0
    for fn in pipelines:
        fn(0)  # warm-up: imports, caches
    while min(spent) < seconds:
        for k, fn in enumerate(pipelines):
            start = time.perf_counter()
            while time.perf_counter() - start < round_s:
                done[k] += fn(i + done[k])
            spent[k] += time.perf_counter() - start
        i += 1
    return [d / s for d, s in zip(done, spent)]


def shard_pipeline(spec_text: str, input_size: int) -> Callable[[int], int]:
    """fn(i) -> 1: the next sample of a ShardImages stream read in this process, epoch after epoch."""
    spec = find_shards(spec_text)
    if spec is None or spec.num_samples is None:
        raise DataError(f"--shards {spec_text}: no shards with an _info.json there (make them with fcmae-make-shards)")
    stream = ShardImages(spec, spec.num_samples, input_size=input_size, seed=0, logger=lambda m: None)
    stream.split_epochs(1, spec.num_samples, 0, 1, 0, logger=lambda m: None)
    state = {"epoch": 0, "items": iter(())}

    def next_sample(i: int) -> int:
        for _ in range(2):
            try:
                next(state["items"])
                return 1
            except StopIteration:
                stream.set_epoch(state["epoch"])
                state["epoch"] += 1
                state["items"] = iter(stream)
        raise DataError(f"--shards {spec_text} gave no sample")

    return next_sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fcmae.tools.bench_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", help="image folder (class sub-folders, or with train/ inside)")
    p.add_argument("--shards", help="the same images as WebDataset shards (fcmae-make-shards): adds fcmae-shards")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time per pipeline")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: measure the GPU path too")
    p.add_argument("--batch_size", type=int, default=128, help="batch of the GPU path")
    p.add_argument("--make_photos", metavar="DIR", help="write test photographs to DIR/train/photos and exit")
    p.add_argument("--photo_size", default="2000x1500", help="WIDTHxHEIGHT of --make_photos")
    p.add_argument("--count", type=int, default=64, help="how many photographs --make_photos writes")
    return p.parse_args(argv)


def run(args) -> int:
    if args.make_photos:
        width, height = (int(v) for v in args.photo_size.lower().split("x"))
        print(f"wrote {args.count} photographs to {make_photos(args.make_photos, width, height, args.count)}")
        return 0
    if not args.data_path:
        raise DataError("--data_path is required (or --make_photos DIR to create test photographs)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(threads)


def _bench(args) -> int:
    root = find_image_root(args.data_path)
    ours = ImageFolderDataset(root, input_size=args.input_size, seed=0)
    base = baseline_dataset(root, args.input_size)
    n = len(ours)
    names = ["fcmae-cpu", "torchvision"]
    pipelines = [lambda i: (ours[i % n], 1)[1], lambda i: (base[i % n], 1)[1]]
    if args.shards:
        names.append("fcmae-shards")
        pipelines.append(shard_pipeline(args.shards, args.input_size))
    if args.device == "cuda":
        gpu = ImageFolderDataset(root, input_size=args.input_size, seed=0, decode="gpu")
        batches = [collate_images([gpu[j % n] for j in range(k, k + args.batch_size)])[0]
                   for k in range(0, max(n, args.batch_size), args.batch_size)]
        device = torch.device("cuda")

        def gpu_device(i):
            gpu.to_device(batches[i % len(batches)], device)
            torch.cuda.synchronize()
            return args.batch_size

        names += ["fcmae-gpu-worker", "fcmae-gpu-device"]
        pipelines += [lambda i: (gpu[i % n], 1)[1], gpu_device]
    print(f"{n} images in {root}, input_size {args.input_size}, {args.seconds:g} s per pipeline, 1 thread, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rates = measure(pipelines, args.seconds)
    for name, rate in zip(names, rates):
        print(f"{name}: {rate:.1f} img/s")
    print(f"ratio {rates[0] / rates[1]:.2f}")
    return 0


def main(argv=None) -> None:
    run_cli("bench_data", lambda: run(parse_args(argv)), (DataError,))


if __name__ == "__main__":
    main()
