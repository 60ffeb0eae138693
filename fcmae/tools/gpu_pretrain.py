"""The GPU check's pre-training part: `launch/pretrain.sh` on synthetic JPEGs, its steady-state images/s.

One epoch of `steps` optimizer steps (one image per step and GPU slot:
`unique` written JPEGs, hard-linked up to steps x batch files), so that no
epoch end (loader restart, checkpoint) falls inside the run, and no timed
checkpoint either (`save_minutes` off); the one checkpoint comes after the
last step. The lr warms up over the whole run
(warmup_epochs 1), so a large batch cannot diverge in so short a run.

From the run's log.jsonl (a `train` record every `print_every` steps, with
its wall-clock `time`):
- `steady_img_s`: images/s between the first record at or after
  `warmup_steps` and the last record (the timed window: `steady_steps`);
- `startup_s`: seconds from the launch to the end of the first step, that
  is to the first record less its other steps at the steady rate (process
  start, data set scan, model build, compilation);
- `steady_vs_bench`: steady_img_s over the bench's `torch` step img/s at the
  same size, batch and mode, when the bench measured it.
Images and checkpoints go to a temporary folder; the log is kept as
OUT/pretrain_log.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# --pretrain-compile: the launcher's --compile and --compile_mode for each choice (best is decided from the bench).
COMPILE_FLAGS = {"auto": ["--compile=auto"], "false": ["--compile=false"],
                 "true": ["--compile=true", "--compile_mode", "whole"],
                 "regional": ["--compile=true", "--compile_mode", "regional"],
                 "cudagraphs": ["--compile=true", "--compile_mode", "cudagraphs"]}
BENCH_MODE = {"false": "eager", "true": "compiled", "regional": "regional", "cudagraphs": "cudagraphs"}


def write_synthetic_images(folder: Path, count: int, side: int, seed: int = 0, unique: Optional[int] = None):
    """`count` smooth random colour JPEGs in an image folder with one class; past `unique`, hard links to them."""
    folder = folder / "train" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    written = min(count, unique or count)
    for i in range(written):
        f = rng.uniform(1, 8, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        img = np.stack([np.sin(f[c, 0] * 6.3 * xx + f[c, 1] * 6.3 * yy + phase[c]) for c in range(3)], -1)
        img = ((img * 0.45 + 0.5) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:06d}.jpg", quality=90)
    for i in range(written, count):
        os.link(folder / f"img_{i % written:06d}.jpg", folder / f"img_{i:06d}.jpg")


def pretrain_compile(args, bench: List[Dict]) -> str:
    """The run's --pretrain-compile choice: as asked, or for `best` the fastest of the bench's `torch` step modes.

    `best` compares eager, compiled and regional (cudagraphs only when asked for by name) at the run's size,
    else at any size, and keeps `auto` when fewer than two of them were measured.
    """
    if args.pretrain_compile != "best":
        return args.pretrain_compile
    size = "quick" if args.quick else "base"
    choice = {mode: word for word, mode in BENCH_MODE.items() if mode != "cudagraphs"}
    for rows in ([r for r in bench if r["size"] == size], bench):  # the run's size first, else any size
        ms = {r["mode"]: r["ms"] for r in rows if r["what"] == "step" and r["backend"] == "torch"
              and r["mode"] in choice and r.get("ms")}
        if len(ms) >= 2:
            return choice[min(ms, key=ms.get)]
    return "auto"


def pretrain_settings(args, device: torch.device) -> Dict:
    """Size, batch, steps and the launcher's model flags of the run (--quick: a tiny CPU run)."""
    if args.quick:
        return {"size": "quick", "batch": args.pretrain_batch or 8, "side": 72, "unique": 8,
                "model_args": ["atto", "demo", "--depths", "[1,1,2,1]", "--dims", "[16,32,48,64]",
                               "--decoder_dim", "32", "--input_size", "64", "--num_workers", "0",
                               "--print_every", "1", "--decode", "cpu"]}
    return {"size": "base", "batch": args.pretrain_batch or 128, "side": 256, "unique": 512,
            "model_args": ["base", "800ep", "--input_size", "224", "--num_workers", "8", "--print_every", "10",
                           "--blr", "1.5e-3", "--decode", "gpu" if device.type == "cuda" else "cpu"]}


def steady_state(records: List[Dict], batch: int, warmup_steps: int, launched: float) -> Dict:
    """steady_img_s, steady_steps and startup_s from log.jsonl's train records (module docstring)."""
    train = [r for r in records if r.get("type") == "train"]
    result = {"steps": train[-1]["step"] if train else 0, "final_loss": round(train[-1]["loss"], 5) if train else None,
              "steady_img_s": None, "steady_steps": 0, "startup_s": None}
    window = [r for r in train if r["step"] >= warmup_steps]
    if len(window) < 2:
        return result
    first, last = window[0], window[-1]
    steps, seconds = last["step"] - first["step"], last["time"] - first["time"]
    if steps <= 0 or seconds <= 0:
        return result
    step_s = seconds / steps
    startup = train[0]["time"] - launched - (train[0]["step"] - 1) * step_s
    result.update(steady_img_s=round(batch / step_s, 1), steady_steps=steps, startup_s=round(max(startup, 0.0), 1))
    return result


def run_pretrain(args, device: torch.device, out: Path, compile_choice: str, bench: List[Dict],
                 timeout_s: Optional[float] = None) -> Dict:
    """launch/pretrain.sh on synthetic images; the steady state from its log.jsonl (module docstring)."""
    run = pretrain_settings(args, device)
    batch, steps = run["batch"], args.pretrain_steps
    with tempfile.TemporaryDirectory(prefix="gpu_check_pretrain_") as tmp:
        # Images and checkpoints (a GB for base) stay in a temporary folder; the log is kept in `out`.
        data, run_dir = Path(tmp) / "images", Path(tmp) / "run"
        write_synthetic_images(data, steps * batch, run["side"], unique=run["unique"])
        cmd = ["bash", str(REPO / "launch" / "pretrain.sh"), *run["model_args"], "--data_path", str(data),
               "--output_dir", str(run_dir), "--resume", "none", "--batch_size", str(batch),
               "--effective_batch", str(batch), "--epochs", "1", "--warmup_epochs", "1", "--vis_images", "0",
               "--save_every", "0", "--save_minutes", "null", *COMPILE_FLAGS[compile_choice],
               "--compile_backend", args.compile_backend, "--device", device.type]
        print("pretrain:", " ".join(cmd), flush=True)
        # One process (the number is per GPU), on this interpreter (the machine may have only `python3`).
        env = dict(os.environ, NPROC_PER_NODE="1", PYTHON=sys.executable)
        launched, error = time.time(), None
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout_s)
            output = proc.stdout
            if proc.returncode != 0:
                error = f"launch/pretrain.sh exited with {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            error = f"launch/pretrain.sh stopped after {timeout_s:.0f} s (the time budget)"
        log_text = (run_dir / "log.jsonl").read_text() if (run_dir / "log.jsonl").is_file() else ""
    print("\n".join(output.splitlines()[-15:]), flush=True)
    (out / "pretrain_log.jsonl").write_text(log_text)
    records = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    result = {"size": run["size"], "batch": batch, "compile": compile_choice,
              **steady_state(records, batch, args.pretrain_warmup_steps, launched)}
    mode = BENCH_MODE.get(compile_choice)
    bench_img_s = next((r["img_s"] for r in bench if r["what"] == "step" and r["backend"] == "torch"
                        and r["size"] == run["size"] and r["batch"] == batch and r["mode"] == mode
                        and r.get("img_s")), None)
    result["bench_img_s"] = bench_img_s
    result["steady_vs_bench"] = (round(result["steady_img_s"] / bench_img_s, 3)
                                 if bench_img_s and result["steady_img_s"] else None)
    if error:
        result["error"] = error
    return result


def pretrain_estimate_s(args, device: torch.device, compile_choice: str, bench: List[Dict]) -> float:
    """Expected seconds of the run from the bench: its steps at the bench's step time, plus its compilation."""
    run = pretrain_settings(args, device)
    mode = BENCH_MODE.get(compile_choice, "eager")
    rows = [r for r in bench if r["what"] == "step" and r["backend"] == "torch" and r["size"] == run["size"]
            and r["mode"] == mode and r.get("ms")]
    if not rows:
        return 0.0
    row = min(rows, key=lambda r: abs(r["batch"] - run["batch"]))
    return (row["compile_s"] or 0.0) + args.pretrain_steps * row["ms"] / 1000 * run["batch"] / row["batch"]
