"""Time the sparse encoder against the dense timm model, the FCMAE step, or the depthwise conv's methods.

    python -m fcmae.tools.bench_encoder --size tiny --batch 8 --img-size 224 --mask-ratio 0.6 --threads 2
    python -m fcmae.tools.bench_encoder --mode step --size atto --batch 16    # full pre-training step
    python -m fcmae.tools.bench_encoder --mode dwconv --size tiny --device cuda   # methods of sparse.depthwise

--mode encoder (default): encoder forward + backward of each backend and timm.
--mode step: the full FCMAE pre-training step (forward, loss, backward,
AdamW) of `fcmae.build_fcmae(size)` with each backend; minimum step time.
--mode dwconv: every method of the depthwise conv per stage (sparse.depthwise).

Every backend and the dense model get the same weights and the same images;
the sparse backends also get the same mask. Steps are interleaved (one step
of each model in turn, repeated) so that a slow phase of the machine hits all
of them alike; the median step time is reported, with its ratio to the dense
model. Memory: the bytes of tensors saved for backward (what a step holds
between forward and backward; deterministic, any device) and, on CUDA, the
peak allocated memory of a step.
"""

import argparse
import statistics
from typing import Callable, Dict, List

import torch

from fcmae.tools import bench_parts
from fcmae.tools.bench_parts import timed_call
from fcmae.weights.conversion import to_timm
from sparse.encoder import BACKENDS, build_encoder, sites_class
from sparse.masking import random_mask
from sparse.sizes import MODEL_SIZES


def saved_activation_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during `step`."""
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out.backward()
    return sum(storages.values())


def main(argv: List[str] = None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=list(MODEL_SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--backends", nargs="+", default=None, help=f"of {BACKENDS}; default: all available")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="encoder", choices=["encoder", "step", "dwconv"])
    parser.add_argument("--profile", action="store_true", help="--mode step: also print a torch.profiler table")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="--mode step/dwconv: wall-clock or this process's CPU time (CPU only; busy machines)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        parser.error("--clock cpu times CPU work only; use --clock wall with --device " + args.device)
    if args.mode != "encoder":
        torch.set_num_threads(args.threads)
        return bench_parts.bench_step(args) if args.mode == "step" else bench_parts.bench_dwconv(args)

    import timm  # the dense baseline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends
    if backends is None:
        backends = []
        for name in BACKENDS:
            try:
                sites_class(name)
                backends.append(name)
            except ImportError:
                print(f"(backend {name!r} not available: skipped)")

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    encoder = build_encoder(args.size).to(device)
    dense = timm.create_model(f"convnextv2_{args.size}", num_classes=0).to(device)
    dense.load_state_dict(to_timm(encoder.state_dict()), strict=False)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    num_patches = (args.img_size // 32) ** 2
    mask = random_mask(args.batch, num_patches, args.mask_ratio, generator=gen).to(device)

    steps: Dict[str, Callable[[], torch.Tensor]] = {"dense (timm)": lambda: dense.forward_features(imgs).sum()}
    for name in backends:
        model = build_encoder(args.size, backend=name).to(device)
        model.load_state_dict(encoder.state_dict())
        steps[name] = lambda model=model: model(imgs, mask).sum()

    def run_step(name):
        return timed_call(lambda: steps[name]().backward(), device)[1]

    for name in steps:
        for _ in range(args.warmup):
            run_step(name)
    times = {name: [] for name in steps}
    for _ in range(args.iters):
        for name in steps:
            times[name].append(run_step(name))

    results = {}
    for name in steps:
        result = {"median_s": statistics.median(times[name]), "saved_MiB": saved_activation_bytes(steps[name]) / 2**20}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run_step(name)
            result["peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        results[name] = result

    base = results["dense (timm)"]["median_s"]
    print(
        f"convnextv2_{args.size}, batch {args.batch}, {args.img_size}x{args.img_size}, mask ratio {args.mask_ratio}, "
        f"{args.device}, {args.threads} threads, median of {args.iters} forward+backward steps"
    )
    header = f"{'model':<14} {'time/step':>10} {'x dense':>8} {'saved for bwd':>14}"
    if device.type == "cuda":
        header += f" {'peak mem':>10}"
    print(header)
    for name, r in results.items():
        line = f"{name:<14} {r['median_s'] * 1000:>8.1f}ms {r['median_s'] / base:>7.2f}x {r['saved_MiB']:>10.1f} MiB"
        if "peak_MiB" in r:
            line += f" {r['peak_MiB']:>6.0f} MiB"
        print(line)
    return results


if __name__ == "__main__":
    main()
