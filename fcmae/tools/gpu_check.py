"""One command for a machine with a GPU: the CUDA tests, the benchmark table and a short pre-training run.

    bash launch/gpu_check.sh                              # everything, on the GPU (output/gpu_check)
    bash launch/gpu_check.sh --sizes base --parts bench   # one part, one size
    bash launch/gpu_check.sh --device cpu --quick --out /tmp/check   # the same script on tiny configs (CI)

Parts (--parts, run in the order given; default tests,bench,pretrain; data
and dwconv on request):
- tests: pytest on the tests marked `cuda` (they skip on CPU); counts of
  passed, failed and skipped tests.
- bench: the encoder and the full pre-training step of each size and
  backend, eager and compiled, bf16 autocast (fcmae.tools.gpu_bench).
- pretrain: `launch/pretrain.sh` on synthetic images written to a temporary
  image folder (300 steps of base at 224 by default), through the real
  loader; images/s and the final loss from the run's log.jsonl (kept as
  OUT/pretrain_log.jsonl; images and checkpoints go to a temporary folder).
  `--pretrain-compile best` (default) passes `--compile true` when this
  run's bench measured the compiled step of the `torch` backend faster than
  eager, `false` when slower, and leaves the command's default otherwise.
- data: `python -m fcmae.tools.bench_data` on photographs it writes first
  (ImageNet-like 500x375 JPEGs): images/s per process of each loading
  pipeline (JSON key `data`).
- dwconv: `python -m fcmae.tools.bench_encoder --mode dwconv`, the depthwise conv's
  methods per stage (base at batch 64; JSON key `dwconv`, ms per call).

Every part runs with the training defaults of the device
(fcmae.runtime.device: TF32, cudnn.benchmark, fused AdamW), and
subprocesses use this interpreter (`PYTHON` is set for the launcher).

Writes OUT/gpu_check.json and OUT/gpu_check.md, rewritten after every part
and every bench row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from fcmae.runtime.device import configure_device
from fcmae.runtime.files import write_text_atomic
from fcmae.tools import bench_encoder as sparse_bench
from fcmae.tools.gpu_bench import Arch, bench_row
from sparse.depthwise import depthwise_method
from sparse.encoder import sites_class
from sparse.sizes import MODEL_SIZES

REPO = Path(__file__).resolve().parents[2]
PARTS = ("tests", "bench", "pretrain", "data", "dwconv")
DEFAULT_PARTS = ("tests", "bench", "pretrain")
FULL_SIZES = {"tiny": 128, "base": 64, "huge": 32}  # batch per size at 224 (the issue's table)
BENCH_BACKENDS = ("torch", "dense-masked", "timm", "minkowski")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/gpu_check", help="output folder (default: output/gpu_check)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny configurations, few steps (CI, smoke test)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help="comma-separated, of: " + ",".join(PARTS) + " (default: " + ",".join(DEFAULT_PARTS) + ")")
    parser.add_argument("--sizes", default=",".join(FULL_SIZES),
                        help="bench sizes (--quick uses one tiny custom config instead)")
    parser.add_argument("--backends", default=None,
                        help="bench backends, of " + ",".join(BENCH_BACKENDS) + " (default: all installed)")
    parser.add_argument("--what", default="encoder,step", help="bench rows: encoder, step or both")
    parser.add_argument("--modes", default="eager,compiled", help="bench modes: eager, compiled or both")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per row (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3; quick 1)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; on CPU aot_eager: inductor's C++ "
                             "build takes minutes on a small CPU)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 300; quick 6)")
    parser.add_argument("--pretrain-compile", default="best", choices=["best", "auto", "true", "false"],
                        help="the pre-training run's --compile: best = whichever this run's bench measured faster "
                             "for the torch backend's step (else the command's default, auto)")
    parser.add_argument("--data-images", type=int, default=None,
                        help="data: photographs written (default 256; quick 8)")
    parser.add_argument("--data-seconds", type=float, default=None,
                        help="data: measuring seconds per pipeline (default 5; quick 0.3)")
    args = parser.parse_args(argv)
    args.parts = split_choices(parser, "--parts", args.parts, PARTS)
    args.sizes = split_choices(parser, "--sizes", args.sizes, tuple(FULL_SIZES))
    args.what = split_choices(parser, "--what", args.what, ("encoder", "step"))
    args.modes = split_choices(parser, "--modes", args.modes, ("eager", "compiled"))
    if args.backends is not None:
        args.backends = split_choices(parser, "--backends", args.backends, BENCH_BACKENDS)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu for the CPU run)")
    args.iters = args.iters or (2 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 3)
    args.compile_backend = args.compile_backend or ("inductor" if args.device == "cuda" else "aot_eager")
    args.pretrain_steps = args.pretrain_steps or (6 if args.quick else 300)
    args.data_images = args.data_images or (8 if args.quick else 256)
    args.data_seconds = args.data_seconds or (0.3 if args.quick else 5.0)
    return args


def split_choices(parser, flag: str, value: str, allowed) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        parser.error(f"{flag}: {', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")
    return items


class Report:
    """The JSON result and its Markdown rendering, written atomically after every update."""

    def __init__(self, out: Path, device: torch.device, args: argparse.Namespace):
        self.out = out
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
        self.data = {"device": name, "tests": None, "bench": [], "pretrain": None}
        self.settings = (f"quick={args.quick}, parts={','.join(args.parts)}, iters={args.iters}, "
                         f"warmup={args.warmup}, compile backend={args.compile_backend}, torch {torch.__version__}")
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self):
        outputs = (("gpu_check.json", json.dumps(self.data, indent=2) + "\n"), ("gpu_check.md", self.markdown()))
        for name, text in outputs:
            write_text_atomic(self.out / name, text)

    def markdown(self) -> str:
        d = self.data
        lines = [f"# GPU check: {d['device']}", "", f"Settings: {self.settings}.", ""]
        if d["tests"] is not None:
            t = d["tests"]
            lines += [f"Tests marked cuda: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped.", ""]
        if d["bench"]:
            lines += ["Bench: ms per step (median), images/s, peak allocated MiB, model FLOPs utilisation "
                      "(visible sites; bf16 peak of the device).", "",
                      "| size | batch | what | backend | compiled | ms | img/s | peak MiB | MFU |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in d["bench"]:
                if "error" in r:
                    cells = [f"error: {r['error'][:80]}", "", "", ""]
                else:
                    cells = [fmt(r["ms"], ".1f"), fmt(r["img_s"], ".0f"), fmt(r["peak_mib"], ".0f"),
                             fmt(r["mfu"], ".1%")]
                lines.append(f"| {r['size']} | {r['batch']} | {r['what']} | {r['backend']} | "
                             f"{'yes' if r['compiled'] else 'no'} | " + " | ".join(cells) + " |")
            lines.append("")
        if d["pretrain"] is not None:
            p = d["pretrain"]
            lines += [f"Pre-training: {p['steps']} steps, {fmt(p['img_s'], '.0f')} images/s, "
                      f"final loss {fmt(p['final_loss'], '.4f')}, compile {d.get('pretrain_compile', 'auto')}"
                      + (f"; {p['error']}" if "error" in p else "") + ".", ""]
        if d.get("data") is not None:
            data = d["data"]
            rates = ", ".join(f"{name} {rate:.0f}" for name, rate in data.get("img_s", {}).items())
            lines += [f"Data loading ({data['images']} photographs of {data['photo_size']}, input "
                      f"{data['input_size']}, images/s per process, 1 thread): {rates or data.get('error')}.", ""]
        if d.get("dwconv"):
            columns = [k for k in d["dwconv"][0] if k.startswith(("conv:", "wgrad:"))]
            lines += ["Depthwise conv, ms per call by method (sparse.depthwise):", "",
                      "| p | C | " + " | ".join(columns) + " | fastest | default |",
                      "|---|---|" + "---|" * (len(columns) + 2)]
            for r in d["dwconv"]:
                lines.append(f"| {r['p']} | {r['channels']} | " + " | ".join(f"{r[c]:.3f}" for c in columns)
                             + f" | {','.join(r['fastest'])} | {','.join(r['default'])} |")
            lines.append("")
        return "\n".join(lines)


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run_tests(out: Path) -> Dict[str, int]:
    """pytest -m cuda over the test suite; counts from its JUnit XML."""
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
           str(REPO / "tests")]
    print("tests:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print("\n".join(proc.stdout.splitlines()[-25:]), flush=True)
    if not xml.is_file():
        return {"passed": 0, "failed": 1, "skipped": 0}  # pytest could not even run: count it as a failure
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(xml).getroot()
    for suite in (root.iter("testsuite")):
        for key in total:
            total[key] += int(suite.get(key, 0))
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def bench_archs(args) -> list:
    if args.quick:
        return [Arch("quick", "atto", (1, 1, 2, 1), (16, 32, 48, 64), img_size=64, batch=4, decoder_dim=32)]
    return [Arch(s, s, *MODEL_SIZES[s], img_size=224, batch=FULL_SIZES[s]) for s in args.sizes]


def available_backends(requested) -> List[str]:
    names = []
    for name in requested or BENCH_BACKENDS:
        if name in ("torch", "dense-masked", "timm"):
            names.append(name)
            continue
        try:
            sites_class(name)
            names.append(name)
        except ImportError as e:
            if requested:
                raise SystemExit(f"error: backend {name!r} is not available: {e}")
            print(f"bench: backend {name!r} not installed: skipped", flush=True)
    return names


def run_bench(args, device: torch.device, report: Report):
    backends = available_backends(args.backends)
    for arch in bench_archs(args):
        for what in args.what:
            for backend in backends:
                for mode in args.modes:
                    row = bench_row(arch, backend, what, mode == "compiled", device, args.warmup, args.iters,
                                    args.compile_backend)
                    report.data["bench"].append(row)
                    report.write()
                    print("bench:", json.dumps(row), flush=True)


def write_synthetic_images(folder: Path, count: int, side: int, seed: int = 0):
    """`count` smooth random colour images (JPEG) in an image folder with one class."""

    folder = folder / "train" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(count):
        f = rng.uniform(1, 8, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        img = np.stack([np.sin(f[c, 0] * 6.3 * xx + f[c, 1] * 6.3 * yy + phase[c]) for c in range(3)], -1)
        img = ((img * 0.45 + 0.5) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg", quality=90)


def pretrain_compile(args, bench: List[Dict]) -> str:
    """The pre-training run's --compile: as asked, or for `best` what the bench's torch step rows say."""
    if args.pretrain_compile != "best":
        return args.pretrain_compile
    size = "quick" if args.quick else "base"
    for rows in ([r for r in bench if r["size"] == size], bench):  # the run's size first, else any size
        ms = {r["compiled"]: r["ms"] for r in rows if r["what"] == "step" and r["backend"] == "torch" and r["ms"]}
        if len(ms) == 2:
            return "true" if ms[True] < ms[False] else "false"
    return "auto"


def run_pretrain(args, device: torch.device, out: Path, compile_mode: str) -> Dict:
    """launch/pretrain.sh on synthetic images; steps, images/s and the final loss from log.jsonl."""
    steps = args.pretrain_steps
    if args.quick:
        batch, epochs = 4, 2
        model_args = ["atto", "demo", "--depths", "[1,1,1,1]", "--dims", "[8,16,16,16]", "--decoder_dim", "32",
                      "--input_size", "64", "--num_workers", "0", "--print_every", "1"]
        side = 72
    else:
        batch, epochs = 64, 5
        model_args = ["base", "800ep", "--input_size", "224", "--num_workers", "8", "--print_every", "10",
                      "--blr", "1.5e-3"]
        side = 256
    epochs = min(epochs, steps)
    per_epoch = -(-steps // epochs)  # steps rounded up to whole epochs
    with tempfile.TemporaryDirectory(prefix="gpu_check_pretrain_") as tmp:
        # Images and checkpoints (a GB for base) stay in a temporary folder; the log is kept in `out`.
        data, run_dir = Path(tmp) / "images", Path(tmp) / "run"
        write_synthetic_images(data, per_epoch * batch, side)
        cmd = ["bash", str(REPO / "launch" / "pretrain.sh"), *model_args, "--data_path", str(data),
               "--output_dir", str(run_dir), "--resume", "none", "--batch_size", str(batch),
               "--effective_batch", str(batch), "--epochs", str(epochs), "--warmup_epochs", "1",
               "--vis_images", "0", "--save_every", "0", "--compile=" + compile_mode,
               "--compile_backend", args.compile_backend, "--device", device.type]
        print("pretrain:", " ".join(cmd), flush=True)
        # One process (the number is per GPU), on this interpreter (the machine may have only `python3`).
        env = dict(os.environ, NPROC_PER_NODE="1", PYTHON=sys.executable)
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log_text = (run_dir / "log.jsonl").read_text() if (run_dir / "log.jsonl").is_file() else ""
    print("\n".join(proc.stdout.splitlines()[-15:]), flush=True)
    (out / "pretrain_log.jsonl").write_text(log_text)
    records = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    result = {"steps": train[-1]["step"] if train else 0, "img_s": None, "final_loss": None}
    if train:
        rates = [r["images_per_s"] for r in train[len(train) // 2:]]  # the second half: past start-up
        result.update(img_s=round(statistics.median(rates), 1), final_loss=round(train[-1]["loss"], 5))
    if proc.returncode != 0:
        result["error"] = f"launch/pretrain.sh exited with {proc.returncode}"
    return result


def run_data(args, device: torch.device) -> Dict:
    """python -m fcmae.tools.bench_data on photographs written to a temporary folder; images/s per pipeline."""
    photo_size, input_size = "500x375", 64 if args.quick else 224  # ImageNet's typical photograph
    result = {"images": args.data_images, "photo_size": photo_size, "input_size": input_size,
              "seconds": args.data_seconds}
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        bench = [sys.executable, "-m", "fcmae.tools.bench_data"]
        cmds = [bench + ["--make_photos", tmp, "--count", str(args.data_images), "--photo_size", photo_size],
                bench + ["--data_path", tmp, "--device", device.type, "--seconds", str(args.data_seconds),
                         "--input_size", str(input_size)]]
        for cmd in cmds:
            print("data:", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print("\n".join(proc.stdout.splitlines()[-8:]), flush=True)
            if proc.returncode != 0:
                result["error"] = f"fcmae.tools.bench_data exited with {proc.returncode}: {proc.stdout.strip()[-200:]}"
                return result
    lines = [line.split() for line in proc.stdout.splitlines()]
    result["img_s"] = {w[0][:-1]: float(w[1]) for w in lines if len(w) == 3 and w[2] == "img/s"}
    result["ratio"] = next((float(w[1]) for w in lines if len(w) == 2 and w[0] == "ratio"), None)
    return result


def run_dwconv(args, device: torch.device) -> List[Dict]:
    """fcmae.tools.bench_encoder --mode dwconv: ms per call of each depthwise conv method, per stage."""

    size, batch, img = ("atto", 2, 64) if args.quick else ("base", 64, 224)
    results = sparse_bench.main(["--mode", "dwconv", "--size", size, "--batch", str(batch), "--img-size", str(img),
                                 "--device", device.type, "--iters", str(args.iters), "--warmup", str(args.warmup),
                                 "--threads", str(torch.get_num_threads())])
    rows = []
    for (p, channels), seconds in results.items():
        ms = {name: round(t * 1000, 4) for name, t in seconds.items()}
        fastest = [min((k for k in ms if k.startswith(part)), key=ms.get).split(":")[1] for part in ("conv:", "wgrad:")]
        rows.append({"size": size, "batch": batch, "p": p, "channels": channels, **ms, "fastest": fastest,
                     "default": list(depthwise_method(device.type, p))})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    report = Report(out, device, args)
    configure_device(device)  # the training defaults (TF32, cudnn.benchmark on CUDA), as the commands set them
    if device.type == "cpu":
        torch.set_num_threads(1)  # small CPU models gain little from threads, and lose a lot on a busy machine
    print(f"gpu check on {report.data['device']}: {report.settings}; results in {out}", flush=True)
    for part in args.parts:
        begin = time.perf_counter()
        if part == "tests":
            report.data["tests"] = run_tests(out)
        elif part == "bench":
            run_bench(args, device, report)
        elif part == "pretrain":
            report.data["pretrain_compile"] = compile_mode = pretrain_compile(args, report.data["bench"])
            report.data["pretrain"] = run_pretrain(args, device, out, compile_mode)
        elif part == "data":
            report.data["data"] = run_data(args, device)
        else:
            report.data["dwconv"] = run_dwconv(args, device)
        report.write()
        print(f"{part}: done in {time.perf_counter() - begin:.0f} s", flush=True)
    print(report.markdown(), flush=True)
    tests = report.data["tests"]
    failed = [(report.data.get(k) or {}).get("error") for k in ("pretrain", "data")]
    return 1 if (tests and tests["failed"]) or any(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
