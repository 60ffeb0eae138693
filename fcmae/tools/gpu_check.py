"""One command for a machine with a GPU: the CUDA tests, the benchmark table and a short pre-training run.

    bash launch/gpu_check.sh --preset speed                 # the prepared GPU command: 7 minutes, rows by value
    bash launch/gpu_check.sh                                # the grid: tests, bench, pretrain (output/gpu_check)
    bash launch/gpu_check.sh --sizes base --parts bench     # one part, one size
    bash launch/gpu_check.sh --device cpu --quick --out /tmp/check   # the same script on tiny configs (CI)

Parts (--parts, run in the order given; default tests,bench,pretrain, with
--preset speed bench,pretrain; data and dwconv on request):
- tests: pytest on the tests marked `cuda` (they skip on CPU); counts of
  passed, failed and skipped tests.
- bench: the encoder and the full pre-training step per size, batch, backend
  and mode (eager, compiled, regional, cudagraphs), bf16 autocast
  (fcmae.tools.gpu_bench); which rows, in which order, and the time budget:
  fcmae.tools.gpu_rows (the grid, or the speed preset's rows by value).
- pretrain: `launch/pretrain.sh` on synthetic JPEGs (base at 224, batch
  128, 240 steps, the first 40 untimed; GPU decoding on CUDA), through the
  real loader: steady-state images/s, start-up seconds and the final loss
  (fcmae.tools.gpu_pretrain). `--pretrain-compile best` (default) runs it
  in the fastest of the bench's eager, compiled and regional `torch` steps.
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
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fcmae.runtime.device import configure_device
from fcmae.runtime.files import write_text_atomic
from fcmae.tools import bench_encoder as sparse_bench
from fcmae.tools.gpu_bench import MODES
from fcmae.tools.gpu_pretrain import COMPILE_FLAGS, pretrain_compile, pretrain_estimate_s, run_pretrain
from fcmae.tools.gpu_rows import FULL_SIZES, Budget, grid_rows, run_rows, speed_rows
from sparse.depthwise import depthwise_method
from sparse.encoder import sites_class
from sparse.sizes import MODEL_SIZES

REPO = Path(__file__).resolve().parents[2]
PARTS = ("tests", "bench", "pretrain", "data", "dwconv")
DEFAULT_PARTS = ("tests", "bench", "pretrain")
PRESETS = {"speed": {"parts": ("bench", "pretrain"), "budget_min": 7.0}}
BENCH_BACKENDS = ("torch", "dense-masked", "timm", "minkowski")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/gpu_check", help="output folder (default: output/gpu_check)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny configurations, few steps (CI, smoke test)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="speed: the bench rows by value within a time budget (fcmae.tools.gpu_rows), then "
                             "the steady-state pre-training run; --sizes, --backends, --what, --modes do not apply")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="minutes for the whole check: rows that would end later are skipped and recorded "
                             "(default: 7 with --preset speed, else no limit; 0: no limit)")
    parser.add_argument("--parts", default=None,
                        help="comma-separated, of: " + ",".join(PARTS) + " (default: " + ",".join(DEFAULT_PARTS)
                             + "; with --preset speed: bench,pretrain)")
    parser.add_argument("--sizes", default=",".join(FULL_SIZES),
                        help="bench sizes (default tiny,base,huge; --quick puts tiny widths in their place)")
    parser.add_argument("--batch", type=int, default=None,
                        help="the grid's bench batch of every size (default tiny 128, base 64, huge 32; quick 4 "
                             "and 8)")
    parser.add_argument("--img-size", type=int, default=224, help="bench image side (default 224; quick 64)")
    parser.add_argument("--backends", default=None,
                        help="bench backends, of " + ",".join(BENCH_BACKENDS) + " (default: all installed)")
    parser.add_argument("--what", default="encoder,step", help="bench rows: encoder, step or both")
    parser.add_argument("--modes", default="eager,compiled", help="bench modes, of " + ",".join(MODES)
                        + " (default eager,compiled)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per row (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3; quick 1)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; on CPU aot_eager: inductor's C++ "
                             "build takes minutes on a small CPU)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 240; quick 6)")
    parser.add_argument("--pretrain-warmup-steps", type=int, default=None,
                        help="pre-training steps before the timed window (default 40; quick 2)")
    parser.add_argument("--pretrain-batch", type=int, default=None, help="pre-training batch (default 128; quick 8)")
    parser.add_argument("--pretrain-compile", default="best", choices=["best", *COMPILE_FLAGS],
                        help="the pre-training run's compilation: best = the fastest of this run's eager, compiled "
                             "and regional torch steps (else the command's default, auto); true = whole model")
    parser.add_argument("--data-images", type=int, default=None,
                        help="data: photographs written (default 256; quick 8)")
    parser.add_argument("--data-seconds", type=float, default=None,
                        help="data: measuring seconds per pipeline (default 5; quick 0.3)")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    args.parts = split_choices(parser, "--parts", args.parts or ",".join(preset.get("parts", DEFAULT_PARTS)), PARTS)
    args.sizes = split_choices(parser, "--sizes", args.sizes, tuple(MODEL_SIZES))
    args.what = split_choices(parser, "--what", args.what, ("encoder", "step"))
    args.modes = split_choices(parser, "--modes", args.modes, MODES)
    if args.backends is not None:
        args.backends = split_choices(parser, "--backends", args.backends, BENCH_BACKENDS)
    for flag in ("batch", "img_size", "pretrain_steps", "pretrain_batch", "iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu for the CPU run)")
    args.iters = args.iters or (2 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 3)
    args.compile_backend = args.compile_backend or ("inductor" if args.device == "cuda" else "aot_eager")
    args.pretrain_steps = args.pretrain_steps or (6 if args.quick else 240)
    if args.pretrain_warmup_steps is None:
        args.pretrain_warmup_steps = 2 if args.quick else 40
    if not 0 <= args.pretrain_warmup_steps < args.pretrain_steps:
        parser.error(f"--pretrain-warmup-steps must be in [0, --pretrain-steps), got {args.pretrain_warmup_steps}")
    args.data_images = args.data_images or (8 if args.quick else 256)
    args.data_seconds = args.data_seconds or (0.3 if args.quick else 5.0)
    budget_min = preset.get("budget_min") if args.budget_min is None else args.budget_min
    args.budget_s = budget_min * 60 if budget_min else None
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
        self.data = {"device": name, "preset": args.preset, "budget_s": args.budget_s, "elapsed_s": 0.0,
                     "tests": None, "bench": [], "skipped": [], "pretrain": None}
        self.settings = (f"preset={args.preset}, quick={args.quick}, parts={','.join(args.parts)}, "
                         f"iters={args.iters}, warmup={args.warmup}, compile backend={args.compile_backend}, "
                         f"budget={fmt(args.budget_s, '.0f')} s, torch {torch.__version__}")
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self):
        outputs = (("gpu_check.json", json.dumps(self.data, indent=2) + "\n"), ("gpu_check.md", self.markdown()))
        for name, text in outputs:
            write_text_atomic(self.out / name, text)

    def markdown(self) -> str:
        d = self.data
        lines = [f"# GPU check: {d['device']}", "", f"Settings: {self.settings}; {d['elapsed_s']:.0f} s so far.", ""]
        if d["tests"] is not None:
            t = d["tests"]
            lines += [f"Tests marked cuda: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped.", ""]
        if d["bench"]:
            lines += ["Bench: ms per step (median), images/s, peak allocated MiB, model FLOPs utilisation "
                      "(visible sites; bf16 peak of the device); compile s: from the first call to the first "
                      "timed step.", "",
                      "| size | batch | what | backend | mode | compile s | ms | img/s | peak MiB | MFU |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in d["bench"]:
                if "error" in r:
                    cells = [f"error: {r['error'][:80]}", "", "", "", ""]
                else:
                    cells = [fmt(r["compile_s"], ".1f"), fmt(r["ms"], ".1f"), fmt(r["img_s"], ".0f"),
                             fmt(r["peak_mib"], ".0f"), fmt(r["mfu"], ".1%")]
                lines.append(f"| {r['size']} | {r['batch']} | {r['what']} | {r['backend']} | {r['mode']} | "
                             + " | ".join(cells) + " |")
            lines.append("")
        if d["skipped"]:
            lines += ["Not run:", ""] + [f"- {r['size']} {r['batch']} {r['what']} {r['backend']} {r['mode']}: "
                                          f"{r['reason']}" for r in d["skipped"]] + [""]
        if d["pretrain"] is not None:
            p = d["pretrain"]
            if "skipped" in p:
                lines += [f"Pre-training: not run ({p['skipped']}).", ""]
            else:
                lines += [f"Pre-training ({p['size']}, batch {p['batch']}, compile {p['compile']}): {p['steps']} "
                          f"steps, steady state {fmt(p['steady_img_s'], '.0f')} images/s over {p['steady_steps']} "
                          f"steps ({fmt(p['steady_vs_bench'], '.2f')} of the bench step), start-up "
                          f"{fmt(p['startup_s'], '.0f')} s, final loss {fmt(p['final_loss'], '.4f')}"
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


def run_bench(args, device: torch.device, report: Report, budget: Budget):
    specs = speed_rows(args) if args.preset == "speed" else grid_rows(args, available_backends(args.backends))
    run_rows(specs, args, device, report, budget)


def run_pretrain_part(args, device: torch.device, out: Path, report: Report, budget: Budget) -> Dict:
    """The pretrain part, unless the budget cannot hold it (then the reason, under `skipped`)."""
    report.data["pretrain_compile"] = choice = pretrain_compile(args, report.data["bench"])
    expected = pretrain_estimate_s(args, device, choice, report.data["bench"])
    if not budget.allows(expected):
        return {"skipped": f"time budget: about {expected:.0f} s of steps and compilation expected, "
                           f"{max(budget.left(), 0):.0f} s left"}
    # A run stopped at the budget (plus 2 minutes of grace) still reports the steps it logged.
    timeout = None if args.budget_s is None else max(budget.left(), 60.0) + 120.0
    return run_pretrain(args, device, out, choice, report.data["bench"], timeout)


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
    budget = Budget(args.budget_s)
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
            run_bench(args, device, report, budget)
        elif part == "pretrain":
            report.data["pretrain"] = run_pretrain_part(args, device, out, report, budget)
        elif part == "data":
            report.data["data"] = run_data(args, device)
        else:
            report.data["dwconv"] = run_dwconv(args, device)
        report.data["elapsed_s"] = round(budget.elapsed(), 1)
        report.write()
        print(f"{part}: done in {time.perf_counter() - begin:.0f} s", flush=True)
    print(report.markdown(), flush=True)
    tests = report.data["tests"]
    failed = [(report.data.get(k) or {}).get("error") for k in ("pretrain", "data")]
    return 1 if (tests and tests["failed"]) or any(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
