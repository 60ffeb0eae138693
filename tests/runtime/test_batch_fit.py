"""The per-GPU batch chosen for the device (`batch_fit: auto`; fcmae.runtime.batch_fit, fcmae.pretrain.batch_probe).

The selection code runs on given memory numbers (`GivenMemory`: a device whose
step peaks at numbers the test states, and runs out of memory above a
capacity); on CPU the real trial step of a tiny model runs too, but CPU has no
peak-memory counter, so only the CUDA test reads real peaks.
"""

from typing import Callable, List, Optional

import pytest
import torch

from fcmae.pretrain import main as main_pretrain
from fcmae.pretrain.batch_probe import fit_pretrain_batch, measure_batch, synthetic_step
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime.batch_fit import (
    GIB,
    MEMORY_MARGIN,
    CudaMemory,
    agree_across_ranks,
    batch_candidates,
    fit_to_device,
    fit_to_memory,
    with_pending_note,
)
from fcmae.runtime.distributed import DistInfo
from fcmae.runtime.errors import PlanError
from fcmae.runtime.plan import BatchChoice, make_plan
from tests.helpers import TINY_ARGS

CUDA_INFO = DistInfo(device=torch.device("cuda", 0))  # a device object only: nothing is allocated on it


class GivenMemory:
    """A device whose training step at batch b peaks at fixed + per_image * b + quadratic * b^2 GiB, and runs out of
    memory above `capacity` GiB; `run_step` runs the step it is given for real first (the CPU trial step)."""

    def __init__(self, usable: float, fixed: float, per_image: float, quadratic: float = 0.0,
                 capacity: Optional[float] = None, run_step: bool = False):
        self.usable, self.fixed, self.per_image, self.quadratic = usable, fixed, per_image, quadratic
        self.capacity = usable if capacity is None else capacity
        self.run_step, self.batches = run_step, []

    def true_peak(self, batch: int) -> float:
        return (self.fixed + self.per_image * batch + self.quadratic * batch ** 2) * GIB

    def usable_bytes(self) -> int:
        return int(self.usable * GIB)

    def peak_bytes(self, step: Callable[[int], None], batch: int) -> Optional[int]:
        self.batches.append(batch)
        if self.run_step:
            step(batch)
        peak = self.true_peak(batch)
        return None if peak > self.capacity * GIB else int(peak)


def largest_fitting(memory: GivenMemory, per_process: int, margin: float = MEMORY_MARGIN, reserved: float = 0) -> int:
    """The answer by brute force: the largest divisor whose peak stays within the budget and the capacity."""
    budget = min(memory.usable * GIB * (1 - margin) - reserved, memory.capacity * GIB)
    return max(b for b in range(1, per_process + 1) if per_process % b == 0 and memory.true_peak(b) <= budget)


def base_config(*flags: str):
    return main_pretrain.resolve_config(["base", "800ep", "--data_path", "/nonexistent", *flags])


def test_candidates_are_the_divisors_of_the_per_process_batch():
    assert batch_candidates(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert batch_candidates(24) == [1, 2, 3, 4, 6, 8, 12, 24]
    assert batch_candidates(1) == [1]


@pytest.mark.parametrize("per_process,memory", [
    (512, GivenMemory(80, 2, 0.1)),  # base-like on 8 GPUs: everything fits, no accumulation
    (512, GivenMemory(80, 2, 0.2)),  # 512 needs 104 GiB: 256
    (4096, GivenMemory(80, 2, 0.1)),  # one GPU: 700 would fit, the largest divisor below it is 512
    (24, GivenMemory(10, 1, 0.5)),  # not a power of two: 12 (7 GiB) fits 9 GiB, 24 (13 GiB) does not
    (512, GivenMemory(80, 1, 0.14)),  # 512 peaks at 72.7 GiB: under the 80 usable but over the margin's 72
    (512, GivenMemory(80, 2, 0.05, quadratic=0.0002)),  # grows faster than the line: the trial of 512 steps down
    (512, GivenMemory(80, 2, 0.1, capacity=30)),  # runs out of memory at 30 GiB though 80 were reported usable
    (17, GivenMemory(80, 1, 0.1)),  # divisors 1 and 17 only
])
def test_the_chosen_batch_is_the_largest_divisor_that_fits_with_the_margin(per_process, memory):
    budget = memory.usable * GIB * (1 - MEMORY_MARGIN)
    batch, trials = fit_to_memory(batch_candidates(per_process), lambda b: memory.peak_bytes(None, b), budget)
    assert batch == largest_fitting(memory, per_process)
    assert trials[batch] is not None and trials[batch] <= budget  # the chosen batch has run (a confirmation trial)
    assert len(trials) <= 5  # two probes and few confirmations, not a sweep


def test_no_batch_that_fits_is_a_clear_error():
    memory = GivenMemory(10, 12, 0.5)  # the weights alone exceed the device
    with pytest.raises(PlanError, match="out of memory: .* even at per-GPU batch 1"):
        fit_to_memory(batch_candidates(64), lambda b: memory.peak_bytes(None, b), 9 * GIB)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16, 64])
def test_effective_batch_and_lr_stay_the_recipes(world_size):
    cfg = base_config()
    assert cfg.batch_fit == "auto"
    per_process = cfg.effective_batch // world_size
    choice = fit_to_device(per_process, cfg.batch_size, world_size, lambda b: None, GivenMemory(80, 2, 0.12))
    fitted = make_plan(cfg, world_size, 1_281_167, batch_choice=choice)
    recipe = make_plan(cfg, world_size, 1_281_167)
    assert fitted.effective_batch == recipe.effective_batch == 4096
    assert fitted.lr == recipe.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert fitted.batch_size == choice.batch == min(per_process, 512)  # 2 + 0.12 x 512 = 63.4 of 72 GiB; 1024 not
    assert fitted.batch_size * world_size * fitted.update_freq == 4096
    assert fitted.update_freq == max(recipe.update_freq * recipe.batch_size // fitted.batch_size, 1)
    assert fitted.total_steps == recipe.total_steps and fitted.warmup_steps == recipe.warmup_steps


def test_the_plan_note_says_why():
    cfg = base_config()
    choice = fit_to_device(512, 64, 8, lambda b: None, GivenMemory(80, 2, 0.1))
    plan = make_plan(cfg, 8, 1_281_167, batch_choice=choice)
    assert (plan.batch_size, plan.update_freq) == (512, 1)
    text = main_pretrain.format_plan(cfg, plan, "imagenet")
    assert "note             per-GPU batch raised from the recipe's 64 to 512 (batch_fit auto" in text
    assert "the largest divisor of 512 (= effective batch / 8 processes)" in text
    assert "fits 90% of the 80.0 GiB usable" in text
    assert "8: 2.80 GiB, 16: 3.60 GiB, 512: 53.20 GiB" in text  # the measured peaks behind the choice
    assert "effective batch and lr stay the recipe's" in text
    lowered = fit_to_device(512, 64, 8, lambda b: None, GivenMemory(16, 2, 0.5))
    assert lowered.batch == 16 and lowered.note.startswith("per-GPU batch lowered from the recipe's 64 to 16")


def test_ddp_buckets_are_left_out_of_the_budget():
    memory = GivenMemory(80, 2, 0.25)  # 256 peaks at 66 GiB: within 72, not within 72 - 8
    assert fit_to_device(512, 64, 1, lambda b: None, memory).batch == 256
    choice = fit_to_device(512, 64, 8, lambda b: None, memory, unmeasured_bytes=8 * GIB)
    assert choice.batch == 128 == largest_fitting(memory, 512, reserved=8 * GIB)
    assert "less 8.00 GiB for DDP's buckets" in choice.note


@pytest.mark.parametrize("flags,files", [(["--batch_size", "128"], {}), (["--batch_size=64"], {}),
                                         ([], {"batch_size": 32}), (["--batch_fit", "off"], {})])
def test_an_explicit_batch_size_or_off_keeps_todays_plan(tmp_path, flags, files):
    extra = tmp_path / "mine.yaml"
    extra.write_text("".join(f"{key}: {value}\n" for key, value in files.items()) or "seed: 1\n")
    cfg = base_config(*flags, "--config", str(extra))
    assert cfg.batch_fit == "off"
    assert fit_pretrain_batch(cfg, CUDA_INFO, build_model=None) is None  # nothing built or measured
    plan = make_plan(cfg, 8, 1_281_167, batch_choice=fit_pretrain_batch(cfg, CUDA_INFO, build_model=None))
    assert (plan.batch_size, plan.update_freq, plan.effective_batch) == (cfg.batch_size, 4096 // 8 // cfg.batch_size,
                                                                         4096)
    assert plan.notes == ()


def test_auto_fits_on_cuda_only_and_with_update_freq_auto():
    cfg = base_config()
    assert fit_pretrain_batch(cfg, DistInfo(device=torch.device("cpu")), build_model=None) is None
    assert fit_pretrain_batch(base_config("--update_freq", "8"), CUDA_INFO, build_model=None) is None
    assert fit_pretrain_batch(cfg, DistInfo(world_size=3, device=torch.device("cuda", 0)), build_model=None) is None
    with pytest.raises(PlanError, match="cannot be split evenly over 3 processes"):
        make_plan(cfg, 3)  # the plan says so, as without the fit


def test_the_dry_run_says_the_batch_is_measured_at_start():
    cfg = base_config()
    plan = make_plan(cfg, 8)
    assert with_pending_note(plan, "auto", "cuda", None).notes[-1].startswith("batch_fit auto: on CUDA the run")
    assert with_pending_note(plan, "auto", "cpu", None) == plan
    assert with_pending_note(plan, "off", "cuda", None) == plan
    assert with_pending_note(plan, "auto", "cuda", 8) == plan


def test_ranks_take_the_smallest_batch():
    choice = BatchChoice(512, "per-GPU batch raised from the recipe's 64 to 512")
    assert agree_across_ranks(choice, torch.device("cpu")) == choice  # one process: its own

    def other_ranks(*batches: int):  # the collective's result when the other ranks chose `batches`
        return lambda value, device: max([value] + [-float(b) for b in batches])

    agreed = agree_across_ranks(choice, torch.device("cpu"), reduce_max=other_ranks(512, 256, 512))
    assert agreed.batch == 256
    assert agreed.note == choice.note + "; lowered to 256, the largest that every process's GPU fits"
    assert agree_across_ranks(choice, torch.device("cpu"), reduce_max=other_ranks(1024)) == choice


def tiny_config(*flags: str):
    return main_pretrain.resolve_config(["atto", "demo", *TINY_ARGS, "--decoder_dim", "16", "--input_size", "64",
                                         "--effective_batch", "32", "--device", "cpu", "--amp", "off", *flags])


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_trial_step_runs_on_cpu_and_leaves_the_random_draws_alone(world_size):
    cfg = tiny_config()
    memory = GivenMemory(1.0, 0.1, 0.04, run_step=True)  # 16 (0.74 GiB) fits 0.9 GiB; 32 (1.38 GiB) does not
    torch.manual_seed(5)
    before = torch.get_rng_state()
    choice = measure_batch(cfg, world_size, torch.device("cpu"), main_pretrain.build_model, memory)
    assert torch.equal(torch.get_rng_state(), before)
    assert memory.batches[:2] == [8, 16]  # the two probes, each a real step of the tiny model
    params = sum(p.numel() * p.element_size() for p in main_pretrain.build_model(cfg).parameters())
    assert choice.batch == largest_fitting(memory, 32 // world_size, reserved=params if world_size > 1 else 0)
    assert ("DDP's buckets" in choice.note) == (world_size > 1)


def test_the_trial_step_trains_the_real_model():
    cfg = tiny_config()
    model = main_pretrain.build_model(cfg)
    seen: List[torch.Tensor] = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    optimizer = build_optimizer(model, 1e-3, 0.05)
    first = [p.detach().clone() for p in model.parameters()]
    synthetic_step(model, optimizer, cfg, torch.device("cpu"))(3)
    assert seen == [torch.Size([3, 3, 64, 64])]
    assert any(not torch.equal(a, p) for a, p in zip(first, model.parameters()))  # the optimizer stepped
    assert all(p.grad is None for p in model.parameters())  # and the gradients were freed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peaks_grow_with_the_batch_and_the_choice_fits():
    cfg = tiny_config("--device", "cuda")
    device = torch.device("cuda", torch.cuda.current_device())
    memory = CudaMemory(device)
    choice = measure_batch(cfg, 1, device, main_pretrain.build_model, memory)
    assert choice.batch == 32  # the tiny model's largest candidate fits any GPU
    model = main_pretrain.build_model(cfg).to(device)
    step = synthetic_step(model, build_optimizer(model, 0.0, 0.05), cfg, device)
    peaks = [memory.peak_bytes(step, batch) for batch in (4, 16)]
    assert None not in peaks and peaks[1] > peaks[0]
    assert memory.usable_bytes() > peaks[1]
