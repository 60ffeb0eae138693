"""What a finished run shows: a summary of its epochs, and curves.png (loss, lr and top-1 per epoch).

Both are read from the run's log.jsonl (fcmae.runtime.logs), so a run that
was stopped and resumed any number of times is shown whole. The records used:
"train" (loss and lr every `print_every` steps, with epoch and iteration),
"epoch" (the epoch's mean loss and its training time: `seconds`,
`images_per_s`) and the accuracy a command measures (pre-training: the kNN
monitor's "knn" records; fine-tuning: val top-1 in the "epoch" records).

curves.png needs matplotlib, which is optional: without it the run says
how to get the picture (`pip install matplotlib`). For any output folder,
also while its run goes on:

    python -m fcmae.runtime.report OUTPUT_DIR      # the summary, and curves.png drawn again
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from fcmae.runtime.command import run_cli
from fcmae.runtime.errors import UsageError
from fcmae.runtime.files import write_atomic
from fcmae.runtime.logs import format_duration, read_jsonl

PathLike = Union[str, os.PathLike]
CURVES_NAME = "curves.png"


@dataclass(frozen=True)
class Accuracy:
    """Where a command's top-1 accuracy is in log.jsonl, and its name.

    Args:
        name: its name in the summary and the picture ("kNN top-1", "val top-1").
        record_type: the type of the records that hold it ("knn", "epoch").
        key: the key of the value in those records (percent).
    """

    name: str
    record_type: str
    key: str


KNN_TOP1 = Accuracy("kNN top-1", "knn", "top1")  # pre-training's kNN monitor (fcmae.eval.knn)
VAL_TOP1 = Accuracy("val top-1", "epoch", "acc1")  # fine-tuning's validation


def log_kind(records: Sequence[Mapping[str, Any]]) -> Tuple[str, Accuracy]:
    """(the epoch records' loss key, the accuracy) of a log.jsonl: fine-tuning's has `train_loss`."""
    if any(r.get("type") == "epoch" and "train_loss" in r for r in records):
        return "train_loss", VAL_TOP1
    return "loss", KNN_TOP1


def epoch_records(records: Sequence[Mapping[str, Any]], record_type: str = "epoch") -> List[Mapping[str, Any]]:
    """The records of `record_type`, one per epoch (the last written, should an epoch appear twice), in order."""
    by_epoch: Dict[int, Mapping[str, Any]] = {}
    for record in records:
        if record.get("type") == record_type and "epoch" in record:
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def epoch_line_timing(timing: Mapping[str, float]) -> str:
    """`, 12.3 s (47 images/s)` for an epoch line; '' when the epoch was not timed."""
    if not timing:
        return ""
    return f", {timing['seconds']:.1f} s ({timing['images_per_s']:.0f} images/s)"


def summary_lines(records: Sequence[Mapping[str, Any]], loss_key: str, accuracy: Accuracy) -> List[str]:
    """The end-of-run summary: epochs and steps, time per epoch and images/s, the loss and the accuracy (first,
    last and best), from log.jsonl's records."""
    epochs = epoch_records(records)
    if not epochs:
        return []
    last = epochs[-1]
    lines = ["summary (from log.jsonl):",
             f"  epochs           {int(last['epoch'])}" + (f" ({last['step']} optimizer steps)" if "step" in last
                                                         else "")]
    timed = [r for r in epochs if r.get("seconds")]
    if timed:
        seconds = sum(r["seconds"] for r in timed)
        images = sum(r["seconds"] * r["images_per_s"] for r in timed)
        lines.append(f"  time             {seconds / len(timed):.1f} s per epoch, {images / seconds:.1f} images/s "
                     f"({format_duration(seconds)} of training"
                     + (f" in the {len(timed)} epochs timed" if len(timed) < len(epochs) else "") + ")")
    losses = [r for r in epochs if loss_key in r]
    if losses:
        lines.append(f"  loss             {_first_to_last(losses, loss_key, '{:.4f}')}")
    values = [r for r in epoch_records(records, accuracy.record_type) if accuracy.key in r]
    if values:
        best = max(values, key=lambda r: r[accuracy.key])
        lines.append(f"  {accuracy.name:<16} {_first_to_last(values, accuracy.key, '{:.2f}%')}"
                     + (f" (best {best[accuracy.key]:.2f}%, epoch {int(best['epoch'])})" if len(values) > 1 else ""))
    return lines


def _first_to_last(records: Sequence[Mapping[str, Any]], key: str, number: str) -> str:
    first, last = records[0], records[-1]
    text = f"{number.format(last[key])} after epoch {int(last['epoch'])}"
    if len(records) > 1:
        text = f"{number.format(first[key])} after epoch {int(first['epoch'])} -> {text}"
    return text


def train_curve(records: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    """(epochs, values) of `key` in the "train" records, at fractional epochs (epoch - 1 + iteration / iterations:
    epochs count from 1, so the end of epoch 1 is at 1, where its "epoch" record is)."""
    train = [r for r in records if r.get("type") == "train" and key in r]
    iterations: Dict[int, int] = {}
    for r in train:
        iterations[r["epoch"]] = max(iterations.get(r["epoch"], 1), r["iteration"])
    return ([r["epoch"] - 1 + r["iteration"] / iterations[r["epoch"]] for r in train], [r[key] for r in train])


def draw_curves(records: Sequence[Mapping[str, Any]], path: PathLike, loss_key: str, accuracy: Accuracy,
                title: str = "") -> Optional[Path]:
    """curves.png at `path`: loss (per step and per epoch), lr, and the accuracy per epoch; None without matplotlib.

    Drawn with matplotlib's object interface (no pyplot: no window, no global state).
    """
    try:
        from matplotlib.figure import Figure  # optional: the picture only when matplotlib is installed
    except ImportError:
        return None
    figure = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    loss_axes, lr_axes, accuracy_axes = figure.subplots(1, 3)
    steps_x, steps_loss = train_curve(records, "loss")
    loss_axes.plot(steps_x, steps_loss, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
    epochs = [r for r in epoch_records(records) if loss_key in r]
    loss_axes.plot([r["epoch"] for r in epochs], [r[loss_key] for r in epochs], "o-", color="tab:blue",
                   markersize=3, label="epoch mean")
    if any("val_loss" in r for r in epochs):
        loss_axes.plot([r["epoch"] for r in epochs if "val_loss" in r],
                       [r["val_loss"] for r in epochs if "val_loss" in r], "o-", color="tab:orange", markersize=3,
                       label="validation")
    loss_axes.set(title="loss", xlabel="epoch")
    loss_axes.legend(fontsize="small")
    lr_x, lr = train_curve(records, "lr")
    lr_axes.plot(lr_x, lr, color="tab:green")
    lr_axes.set(title="learning rate", xlabel="epoch")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    values = [r for r in epoch_records(records, accuracy.record_type) if accuracy.key in r]
    if values:
        accuracy_axes.plot([r["epoch"] for r in values], [r[accuracy.key] for r in values], "o-", color="tab:red",
                           markersize=3)
    else:
        accuracy_axes.text(0.5, 0.5, "not measured in this run", ha="center", va="center",
                           transform=accuracy_axes.transAxes)
    accuracy_axes.set(title=f"{accuracy.name} (%)", xlabel="epoch")
    if title:
        figure.suptitle(title)
    return write_atomic(path, lambda f: figure.savefig(f, format="png"))


def finish_run(output_dir: PathLike, title: str = "") -> List[str]:
    """The lines a finished run prints last: the summary of its log.jsonl, and where curves.png is (drawn now) or
    how to get it. Rank 0 calls it."""
    output_dir = Path(output_dir)
    log_file = output_dir / "log.jsonl"
    records = read_jsonl(log_file) if log_file.is_file() else []
    if not records:
        return []
    loss_key, accuracy = log_kind(records)
    lines = summary_lines(records, loss_key, accuracy)
    picture = draw_curves(records, output_dir / CURVES_NAME, loss_key, accuracy, title or str(output_dir))
    if picture is not None:
        lines.append(f"  curves           {picture} (loss, lr and {accuracy.name} per epoch)")
    else:
        lines.append(f"  curves           not drawn: matplotlib is not installed (pip install matplotlib, then python "
                     f"-m fcmae.runtime.report {output_dir} draws {CURVES_NAME})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m fcmae.runtime.report OUTPUT_DIR`: the summary of a run's log.jsonl, and its curves.png."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if len(argv) != 1 or argv[0].startswith("-"):
            raise UsageError("usage: python -m fcmae.runtime.report OUTPUT_DIR (a run's output folder, with "
                             "log.jsonl)")
        if not (Path(argv[0]) / "log.jsonl").is_file():
            raise UsageError(f"no log.jsonl in {argv[0]}: give a run's output folder")
        for line in finish_run(argv[0]):
            print(line)
        return 0

    run_cli("fcmae-report", body, (UsageError,))


if __name__ == "__main__":
    main()
