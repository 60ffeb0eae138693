"""One rank of a multi-process test: `python -m tests.rank_child SCENARIO MODULE [args...]`.

tests/runtime/test_ranks.py starts one such process per rank, with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set as torchrun sets them and a short
FCMAE_DIST_TIMEOUT. SCENARIO changes this rank's process before MODULE's
command runs, so that one rank meets what the others do not:

- none: nothing changes;
- nan_on_rank_1: rank 1's 6th training loss (epoch 2, iteration 1) is NaN;
- unreadable_on_rank_1: on rank 1 every image of odd index fails to load (as a zero-byte file does);
- stale_listing_on_rank_1: rank 1 lists FCMAE_TEST_OTHER_CHECKPOINT as the newest checkpoint
  (a node-local output folder, a stale network file system listing);
- other_file_on_rank_1: rank 1 reads FCMAE_TEST_OTHER_CHECKPOINT whatever path it is given;
- sigterm_on_rank_1: rank 1 alone receives SIGTERM, right after its 2nd optimizer step;
- sleep_on_rank_1: rank 1 stops stepping (sleeps for 10 minutes) after its 3rd optimizer step (a wedged
  rank, for the hang watchdog).

Every rank prints `rank R restored step S` when it restores a checkpoint.
"""

import importlib
import os
import sys
from pathlib import Path

RANK = int(os.environ["RANK"])


def nan_on_rank_1() -> None:
    from fcmae.pretrain import main as main_pretrain
    from tests.helpers import build_with_nan_loss

    build_with_nan = build_with_nan_loss(main_pretrain.build_fcmae, at_call=6)

    if RANK == 1:
        main_pretrain.build_fcmae = build_with_nan


def unreadable_on_rank_1() -> None:
    from fcmae.data.folder import ImageFolderDataset

    real_crop_item = ImageFolderDataset.crop_item  # what training reads a sample with

    def crop_item(self, file_index, index):
        if file_index % 2:
            raise OSError(f"cannot identify image file {str(self.files[file_index])!r}")
        return real_crop_item(self, file_index, index)

    if RANK == 1:
        ImageFolderDataset.crop_item = crop_item


def stale_listing_on_rank_1() -> None:
    from fcmae.runtime import checkpoint

    if RANK == 1:
        checkpoint.find_resume = lambda resume, output_dir: Path(os.environ["FCMAE_TEST_OTHER_CHECKPOINT"])


def other_file_on_rank_1() -> None:
    from fcmae.runtime import checkpoint

    real_load = checkpoint.load_checkpoint
    if RANK == 1:
        checkpoint.load_checkpoint = lambda path, *a, **k: real_load(os.environ["FCMAE_TEST_OTHER_CHECKPOINT"], *a, **k)


def sigterm_on_rank_1() -> None:
    import signal

    from fcmae.runtime.trainer import Trainer

    real_step = Trainer._optimizer_step

    def optimizer_step(self):
        real_step(self)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    if RANK == 1:
        Trainer._optimizer_step = optimizer_step


def sleep_on_rank_1() -> None:
    import time

    from fcmae.runtime.trainer import Trainer

    real_step = Trainer._optimizer_step

    def optimizer_step(self):
        real_step(self)
        if self.state.step == 3:
            time.sleep(600)

    if RANK == 1:
        Trainer._optimizer_step = optimizer_step


def report_restores() -> None:
    from fcmae.runtime.trainer import Trainer

    real_restore = Trainer.restore

    def restore(self, saved, path, seed):
        print(f"rank {RANK} restored step {saved['step']} from {path}", flush=True)
        real_restore(self, saved, path, seed)

    Trainer.restore = restore


SCENARIOS = {"none": lambda: None, "nan_on_rank_1": nan_on_rank_1, "unreadable_on_rank_1": unreadable_on_rank_1,
             "stale_listing_on_rank_1": stale_listing_on_rank_1, "other_file_on_rank_1": other_file_on_rank_1,
             "sigterm_on_rank_1": sigterm_on_rank_1, "sleep_on_rank_1": sleep_on_rank_1}


def main() -> None:
    scenario, module, *args = sys.argv[1:]
    SCENARIOS[scenario]()
    report_restores()
    importlib.import_module(module).main(args)


if __name__ == "__main__":
    main()
