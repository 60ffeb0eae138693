"""The device settings of a training run, in one place: CUDA defaults, fused AdamW, torch.compile.

Both commands (fcmae.pretrain.main, finetune.main_finetune) and the GPU
check's bench (fcmae.tools.gpu_check) call `configure_device` once the device is
known, build AdamW with `fused=adamw_fused(model)`, and compile with
`compile_model`, so the measured numbers are those of a training run.

On CUDA (none of these has been measured on a GPU yet; the GPU check,
launch/gpu_check.sh, measures compiled against eager):
- TF32 for float32 matmuls and cuDNN convolutions (`tf32` setting): float32
  work (the master weights' optimizer step, `--amp off`) runs on tensor
  cores with a 10-bit mantissa; bf16/fp16 autocast work is unaffected.
- `cudnn.benchmark`: cuDNN picks the fastest convolution algorithm per
  shape on first use; the shapes of a training run are fixed (fixed batch,
  image size and kept-patch count), so it pays once.
- `torch.compile` on by default (`compile: auto`).
On CPU all of this is off: `configure_device` changes nothing and
`compile: auto` means eager (with inductor, the first step of a tiny model
had not finished after 5 minutes on a 2-core machine).

On both: fused AdamW, one kernel for the whole update instead of a few per
tensor. On the 2-core CPU it takes a quarter of the for-loop AdamW's time
(base: 75 ms against 277 ms per step; docs/benchmarks-history.md).

Not applied: channels-last memory format. The sparse encoder already keeps
its features channels-last ((N, K, p, p, C) patches for `torch`, (N, H, W,
C) maps for `dense-masked`; sparse.sites), so the format has nothing to
change there. Fine-tuning's dense timm model could use it, but timm's
ConvNeXt block permutes to channels-last around its norm and MLP itself,
and the gain is unmeasured. Pinned memory with non_blocking copies is
the loaders' part (`fcmae.runtime.loader.train_loader`, the commands' loss
functions, finetune.engine's evaluation).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from fcmae.runtime import distributed
from fcmae.runtime.errors import ConfigError


def configure_device(device: torch.device, tf32: bool = True) -> None:
    """Set the CUDA defaults of a training run (process-wide); on any other device change nothing.

    Args:
        device: the run's device.
        tf32: allow TF32 in float32 matmuls and cuDNN convolutions.
    """
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")  # = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


# Device types with a fused AdamW kernel in every torch this project supports (CPU's came in torch 2.4).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw_fused(model: nn.Module) -> bool:
    """Whether AdamW can use its fused kernel: every trainable parameter is a float on one CUDA or CPU device."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (bool(params) and len({p.device for p in params}) == 1 and params[0].device.type in FUSED_ADAMW_DEVICES
            and all(p.is_floating_point() for p in params))


def use_compile(setting: Optional[bool], device: torch.device) -> bool:
    """The `compile` setting resolved for `device`: None (auto) means on CUDA only."""
    return device.type == "cuda" if setting is None else setting


def check_compile_backend(backend: str) -> None:
    """A ConfigError unless `backend` is one of torch.compile's backends."""
    import torch._dynamo  # the compiler stack loads only when a backend is checked

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"compile_backend {backend!r} is not a torch.compile backend; known: {', '.join(known)}")


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile(model)`; the returned module shares `model`'s parameters.

    Save `model.state_dict()` (the compiled module's names carry a `_orig_mod.` prefix).

    Args:
        backend: a torch.compile backend (inductor; aot_eager compiles the graph without generating code).
    """
    check_compile_backend(backend)
    # Static shapes: a new batch size (an epoch's last partial batch) compiles once more; dynamo's automatic
    # dynamic shapes would trace symbolic sizes, which the random mask's torch.rand cannot take.
    return torch.compile(model, backend=backend, dynamic=False)


def model_compiler(cfg, device: torch.device) -> Optional[Callable[[nn.Module], nn.Module]]:
    """What `Trainer(compile_fn=...)` gets for a TrainConfig's `compile`/`compile_backend`: None for eager.

    The backend is checked here, before any data is read or model built.
    """
    if not use_compile(cfg.compile, device):
        return None
    check_compile_backend(cfg.compile_backend)
    return lambda model: compile_model(model, cfg.compile_backend)


# ---------------------------------------------------------------- precision
def autocast_context(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA; nothing on CPU or when amp is off."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def precision_note(device: torch.device, amp: str) -> Optional[str]:
    """The line that says a requested mixed precision has no effect (on CPU), or None."""
    if device.type != "cuda" and amp != "off":
        return f"note: --amp {amp} has no effect on {device.type}; training in fp32"
    return None


def grad_scaler(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 on CUDA; None otherwise (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda") if (device.type == "cuda" and amp == "fp16") else None


# ---------------------------------------------------------------- a run's process
@contextmanager
def run_process(cfg) -> Iterator[distributed.DistInfo]:
    """This process's part of a real run: the process group, device defaults and CPU threads; undone after.

    Args:
        cfg: the command's config (reads `device`, `tf32`, `cpu_threads`).

    Yields the DistInfo (rank, world size, device).
    """
    info = distributed.init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        configure_device(info.device, cfg.tf32)
        if info.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        yield info
    finally:
        torch.set_num_threads(threads)  # matters when called in-process (tests, notebooks)
        distributed.cleanup()
