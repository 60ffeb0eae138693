"""The GPU check's bench rows: which run, in which order, within which time budget.

Two plans:

- the grid (default): every size x what x backend x mode asked for
  (`--sizes`, `--what`, `--backends`, `--modes`), in that nesting;
- the speed preset (`--preset speed`): the full pre-training step, most
  valuable rows first, so that a run cut short still answers the first
  questions:
  1. base at batch 128: `torch`, `dense-masked` and timm's dense model,
     each eager then compiled; then `torch` regional (compile start-up);
  2. a batch sweep of `torch` compiled (64, 256, 512, 1024), stopped at the
     first out-of-memory row;
  3. `torch` in CUDA graphs (cudagraphs) at 64 and 128;
  4. tiny at 128 and huge at 32: `torch` and `dense-masked`, compiled.
  The pre-training part (fcmae.tools.gpu_pretrain) comes after the bench.

`--quick` puts tiny widths at 64 pixels in place of the sizes (QUICK_ARCHS)
and takes small batches (QUICK_BATCHES; the preset's QUICK_SPEED).

Budget (`--budget-min`; the preset's default is 7 minutes, none otherwise):
before each row its time is estimated from the rows already run (the latest
of the same mode, and size where there is one: its compilation as it was,
its steps scaled by the batch; a first compiled row of a mode is expected to
take as long as the slowest compiled row so far). A row that would end past
the budget is not run. Skipped rows are recorded with their reason (JSON
key `skipped`), as are the sweep's rows after an out-of-memory row and
cudagraphs rows on a device without CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from fcmae.tools.gpu_bench import Arch, bench_row
from sparse.sizes import MODEL_SIZES

FULL_SIZES = {"tiny": 128, "base": 64, "huge": 32}  # the grid's batch per size at 224
QUICK_ARCHS = {  # --quick: tiny widths at 64 pixels in place of each size
    "tiny": Arch("quick-tiny", "atto", (1, 1, 1, 1), (8, 16, 24, 32), img_size=64, batch=4, decoder_dim=32),
    "base": Arch("quick", "atto", (1, 1, 2, 1), (16, 32, 48, 64), img_size=64, batch=4, decoder_dim=32),
    "huge": Arch("quick-huge", "atto", (1, 1, 3, 1), (16, 32, 48, 64), img_size=64, batch=4, decoder_dim=32),
}
QUICK_BATCHES = (4, 8)  # the grid's batches under --quick
# The speed preset's batches: per size, the sweep's (besides base's) and the CUDA-graph rows'; and under --quick.
SPEED = {"base": 128, "tiny": 128, "huge": 32, "sweep": (64, 256, 512, 1024), "cudagraphs": (64, 128)}
QUICK_SPEED = {"base": 8, "tiny": 8, "huge": 4, "sweep": (4, 16), "cudagraphs": (4, 8)}
SPEED_BACKENDS = ("torch", "dense-masked", "timm")


@dataclass(frozen=True)
class RowSpec:
    """One bench row to run: `bench_row(arch, backend, what, mode, ...)`; `sweep` names its batch sweep."""

    arch: Arch
    backend: str
    what: str
    mode: str
    sweep: Optional[str] = None  # rows of one sweep stop at its first out-of-memory row

    def describe(self) -> Dict:
        return {"size": self.arch.name, "batch": self.arch.batch, "backend": self.backend, "mode": self.mode,
                "what": self.what}


def size_arch(size: str, batch: int, quick: bool, img_size: int = 224) -> Arch:
    """The bench's configuration of a registered size at `batch` (--quick: QUICK_ARCHS' stand-in)."""
    if quick:
        return dataclasses.replace(QUICK_ARCHS.get(size, QUICK_ARCHS["base"]), batch=batch)
    return Arch(size, size, *MODEL_SIZES[size], img_size=img_size, batch=batch)


def grid_rows(args, backends: List[str]) -> List[RowSpec]:
    """The default plan: sizes (each at its batches; --quick: one tiny configuration) x what x backends x modes."""
    if args.quick:
        archs = [size_arch("base", batch, True) for batch in ([args.batch] if args.batch else QUICK_BATCHES)]
    else:
        archs = [size_arch(size, args.batch or FULL_SIZES.get(size, 64), False, args.img_size) for size in args.sizes]
    return [RowSpec(arch, backend, what, mode) for arch in archs for what in args.what for backend in backends
            for mode in args.modes]


def speed_rows(args) -> List[RowSpec]:
    """The speed preset's rows, most valuable first (module docstring)."""

    batches = QUICK_SPEED if args.quick else SPEED

    def arch(size: str, batch: int) -> Arch:
        return size_arch(size, batch, args.quick, args.img_size)

    base = arch("base", batches["base"])
    rows = [RowSpec(base, backend, "step", mode) for backend in SPEED_BACKENDS for mode in ("eager", "compiled")]
    rows.append(RowSpec(base, "torch", "step", "regional"))
    rows += [RowSpec(arch("base", b), "torch", "step", "compiled", sweep="base torch compiled")
             for b in batches["sweep"] if b != base.batch]
    rows += [RowSpec(arch("base", b), "torch", "step", "cudagraphs") for b in batches["cudagraphs"]]
    rows += [RowSpec(arch(size, batches[size]), backend, "step", "compiled") for size in ("tiny", "huge")
             for backend in ("torch", "dense-masked")]
    return rows


class Budget:
    """Seconds allowed for the whole check (None: no limit), counted from its creation."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


def estimate_s(spec: RowSpec, done: List[Dict]) -> float:
    """Expected seconds of a row, from the rows run so far (module docstring); 0 when nothing is known."""
    timed = [r for r in done if r.get("wall_s") is not None and r.get("ms") is not None]
    same_mode = [r for r in timed if r["mode"] == spec.mode]
    similar = [r for r in same_mode if r["size"] == spec.arch.name] or same_mode
    if not similar:
        compiled = [r["wall_s"] for r in timed if r["mode"] != "eager"]
        return max(compiled) if spec.mode != "eager" and compiled else 0.0
    last = similar[-1]
    compile_s = last["compile_s"] or 0.0
    return compile_s + (last["wall_s"] - compile_s) * spec.arch.batch / last["batch"]


def skip_reason(spec: RowSpec, device: torch.device, oom_batch: Dict[str, int], budget: Budget,
                done: List[Dict]) -> Optional[str]:
    """Why the row is not run, or None."""
    if spec.mode == "cudagraphs" and device.type != "cuda":
        return f"cudagraphs needs a CUDA device, not {device.type}"
    if spec.sweep in oom_batch:
        return f"the sweep ran out of memory at batch {oom_batch[spec.sweep]}"
    expected = estimate_s(spec, done)
    if not budget.allows(expected):
        return f"time budget: about {expected:.0f} s expected, {max(budget.left(), 0):.0f} s left"
    return None


def run_rows(specs: List[RowSpec], args, device: torch.device, report, budget: Budget) -> None:
    """Run each row (or record why not) and rewrite the report after each."""
    oom_batch: Dict[str, int] = {}
    for spec in specs:
        reason = skip_reason(spec, device, oom_batch, budget, report.data["bench"])
        if reason is not None:
            report.data["skipped"].append({**spec.describe(), "reason": reason})
            report.write()
            print("bench: skipped", json.dumps(report.data["skipped"][-1]), flush=True)
            continue
        begin = time.perf_counter()
        row = bench_row(spec.arch, spec.backend, spec.what, spec.mode, device, args.warmup, args.iters,
                        args.compile_backend)
        row["wall_s"] = round(time.perf_counter() - begin, 2)
        if row.get("oom") and spec.sweep is not None:
            oom_batch[spec.sweep] = spec.arch.batch
        report.data["bench"].append(row)
        report.data["elapsed_s"] = round(budget.elapsed(), 1)
        report.write()
        print("bench:", json.dumps(row), flush=True)
