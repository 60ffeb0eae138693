"""Time a checkpoint: how long a timed checkpoint holds the training step up, against a save written in the step.

    python -m fcmae.tools.bench_checkpoint --size atto --repeat 9 --threads 1
    python -m fcmae.tools.bench_checkpoint --size base --device cuda --dir /scratch/bench

Builds the pre-training model of `--size` (224x224) with its AdamW optimizer,
whose moments one step fills, in one process, and times the two ways
fcmae.runtime.trainer.Trainer.save writes checkpoint-last.pth:
- "in the step": `save()`, as at an epoch's end: the state is gathered and
  the file written (with fsync) before training goes on;
- "timed, stall": `save(background=True)`, as a timed checkpoint
  (`save_minutes`): the step waits only for the copy of the state to host
  memory; "timed, write" is the background write that follows, waited for
  before the next repetition.
Medians of `--repeat` runs; the files go to a temporary folder under `--dir`.
"""

import argparse
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import torch

from fcmae.model import build_fcmae
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime.checkpoint import tensor_bytes
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.plan import LoopSettings
from fcmae.runtime.trainer import Trainer
from sparse.sizes import MODEL_SIZES


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="atto", choices=list(MODEL_SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the system's temp)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_fcmae(args.size, img_size=224).to(device)
    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95))
    loss, _, _ = model(torch.randn(2, 3, 224, 224, device=device))
    loss.backward()
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after the first step
    settings = LoopSettings(epochs=1, iters_per_epoch=1, update_freq=1, lr=1e-4, min_lr=0.0, warmup_steps=0,
                            total_steps=1, images_per_iter=2, amp="off", print_every=1, save_every=0,
                            keep_checkpoints=0)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        trainer = Trainer(model, optimizer, lambda m, x: m(x)[0], settings, DistInfo(device=device), folder, None,
                          {"size": args.size})
        in_step, stall, write = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            trainer.save()
            in_step.append(time.perf_counter() - started)
            started = time.perf_counter()
            trainer.save(background=True)
            stall.append(time.perf_counter() - started)
            trainer.writer.wait()
            write.append(time.perf_counter() - started - stall[-1])
    size = tensor_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    result = {"in_step_s": statistics.median(in_step), "stall_s": statistics.median(stall),
              "write_s": statistics.median(write), "tensor_mib": size / 2**20}
    print(f"{args.size} on {device} ({torch.get_num_threads()} threads), model + AdamW state "
          f"{result['tensor_mib']:.1f} MiB, medians of {args.repeat}:")
    print(f"  in the step   {result['in_step_s'] * 1000:8.1f} ms")
    print(f"  timed, stall  {result['stall_s'] * 1000:8.1f} ms  (copy to host memory; the step waits for this)")
    print(f"  timed, write  {result['write_s'] * 1000:8.1f} ms  (in the background)")
    return result


if __name__ == "__main__":
    main()
