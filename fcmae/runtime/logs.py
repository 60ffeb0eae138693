"""What users watch during training: progress lines, TensorBoard, a JSON-lines log.

All writers are no-ops on ranks other than 0, so callers need not check.
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from fcmae.runtime.distributed import get_rank
from fcmae.runtime.files import disk_full_error, write_text_atomic

PathLike = Union[str, os.PathLike]


def log(message: str, main_only: bool = True, rank: Optional[int] = None) -> None:
    """Print a line (only on rank 0 when `main_only`), flushed at once."""
    if rank is None:
        rank = get_rank()
    if not main_only or rank == 0:
        print(message, flush=True)


def format_duration(seconds: float) -> str:
    """1:02:03 style; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressMeter:
    """Progress lines with throughput and the ETA of the whole run (`run ETA`: to its last epoch's end).

    `total_steps` counts the data iterations of the run; `start_step` is where
    this process started (after a resume), so rates and ETAs only count work
    done here. `images_per_step` is the global batch of one data iteration.
    """

    def __init__(self, total_steps: int, images_per_step: int, start_step: int = 0, enabled: bool = True, stream=None):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.start_step = start_step
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self._last_t, self._last_step = self.t0, start_step

    def rates(self, step: int) -> Dict[str, float]:
        """Images/s since the previous call and ETA from the average rate so far."""
        now = time.perf_counter()
        recent = max(now - self._last_t, 1e-9)
        images_per_s = (step - self._last_step) * self.images_per_step / recent
        done = step - self.start_step
        eta = (now - self.t0) / done * (self.total_steps - step) if done > 0 else float("nan")
        self._last_t, self._last_step = now, step
        return {"images_per_s": images_per_s, "eta_s": eta, "elapsed_s": now - self.t0}

    def line(self, epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, step: int,
             metrics: Mapping[str, float]) -> Dict[str, float]:
        """Print one progress line; returns the rates it computed."""
        rates = self.rates(step)
        if self.enabled:
            parts = [f"epoch {epoch + 1}/{epochs}", f"step {step_in_epoch}/{steps_per_epoch}"]
            for key, value in metrics.items():
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
            parts.append(f"{rates['images_per_s']:.1f} img/s")
            parts.append(f"run ETA {format_duration(rates['eta_s'])}")  # the rest of the run, not of the epoch
            print("  ".join(parts), file=self.stream, flush=True)
        return rates


class JsonlLogger:
    """Appends one JSON object per line; each line flushed (readable while training runs)."""

    def __init__(self, path: Optional[PathLike], enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(dict(record), default=float) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:  # a full disk: say where (a cut line is skipped by readers of the log)
            raise disk_full_error(e, self.path, len(line)) or e

    def truncate_after(self, key: str, value: float) -> None:
        """Drop records with record[key] > value (e.g. steps logged after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if key not in rec or rec[key] <= value:
                    kept.append(json.dumps(rec))
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))


def read_jsonl(path: PathLike):
    """All records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TensorBoard:
    """A thin SummaryWriter wrapper that does nothing when disabled or when tensorboard is absent."""

    def __init__(self, log_dir: Optional[PathLike], enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: logging goes on without it
            except ImportError:  # tensorboard is optional at run time
                log("tensorboard is not installed; TensorBoard logging is off")
                return
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)

    def image(self, tag: str, image_hwc, step: int) -> None:
        """An (H, W, 3) uint8 array."""
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
