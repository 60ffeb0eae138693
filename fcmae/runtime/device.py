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
- `torch.compile` on by default (`compile: auto`), of the whole model or,
  with `compile_mode: regional`, of each ConvNeXt block (one graph per
  stage, a fraction of the compile time; `compile_regions`), or the whole
  model in CUDA graphs (`compile_mode: cudagraphs`, CUDA only; never run on
  a GPU yet, nor has regional). Inductor's cache lives in the output folder
  (`compile_cache_dir`), so a resumed or requeued run compiles faster.
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

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock
from torch.utils._pytree import tree_map

from fcmae.runtime import distributed
from fcmae.runtime.errors import ConfigError

# How `compile_model` compiles: the whole model, its repeated blocks (regional), or the whole model in CUDA graphs.
COMPILE_MODES = ("whole", "regional", "cudagraphs")
REGIONAL_RECOMPILE_LIMIT = 64


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


def check_compile_mode(mode: str, device: torch.device, backend: str = "inductor") -> None:
    """A ConfigError unless `mode` is one of COMPILE_MODES and can run on `device` with `backend`."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode {mode!r} is not one of: {', '.join(COMPILE_MODES)}")
    if mode == "cudagraphs" and device.type != "cuda":
        raise ConfigError(f"compile_mode cudagraphs captures CUDA graphs and needs a CUDA device, not "
                          f"{device.type}; use whole or regional there")
    if mode == "cudagraphs" and backend != "inductor":
        raise ConfigError(f"compile_mode cudagraphs is inductor's reduce-overhead mode; compile_backend must be "
                          f"inductor, not {backend}")


def compile_model(model: nn.Module, backend: str = "inductor", mode: str = "whole") -> nn.Module:
    """The module a training loop runs, compiled by `mode` (COMPILE_MODES); it shares `model`'s parameters.

    Save `model.state_dict()` (the names of a whole-model compile carry an `_orig_mod.` prefix).

    Args:
        backend: a torch.compile backend (inductor; aot_eager compiles the graph without generating code).
            cudagraphs needs inductor.
        mode: whole: one graph of the whole forward (and its backward). regional: `model` itself is
            returned with its repeated blocks compiled in place (`compile_regions`). cudagraphs: the whole
            model with inductor's reduce-overhead mode (CUDA graphs), CUDA only (`CudaGraphModel`).
    """
    check_compile_backend(backend)
    check_compile_mode(mode, next(model.parameters()).device, backend)
    if mode == "regional":
        return compile_regions(model, backend)
    if mode == "cudagraphs":
        return CudaGraphModel(torch.compile(model, backend=backend, mode="reduce-overhead", dynamic=False))
    # Static shapes: a new batch size (an epoch's last partial batch) compiles once more; dynamo's automatic
    # dynamic shapes would trace symbolic sizes, which the random mask's torch.rand cannot take.
    return torch.compile(model, backend=backend, dynamic=False)


def is_region(module: nn.Module) -> bool:
    """Whether `compile_regions` compiles `module`: timm's ConvNeXt block, or a class marked `compile_region`
    (the sparse encoder's block, sparse.encoder.Block)."""
    return isinstance(module, ConvNeXtBlock) or getattr(type(module), "compile_region", False)


def compile_regions(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every ConvNeXt block of `model` in place (`nn.Module.compile`); the rest stays eager.

    Blocks of one stage have the same shapes, so the first block's graph
    serves them all: dynamo compiles one graph per stage (and per decoder
    width), where a whole-model compile traces and optimises every block.
    Each block compiles with fullgraph=True (a graph break is an error).
    Blocks share one code object for dynamo's recompile limit, so the limit
    is raised to at least REGIONAL_RECOMPILE_LIMIT; blocks whose drop-path
    rates differ (drop_path > 0) compile one graph each. Every forward of the
    model, evaluation included, then runs the compiled blocks.
    """
    blocks = [m for m in model.modules() if is_region(m)]
    if not blocks:
        raise ConfigError(f"compile_mode regional: {type(model).__name__} has no ConvNeXt blocks to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend, dynamic=False, fullgraph=True)
    return model


class CudaGraphModel(nn.Module):
    """A model compiled with mode="reduce-overhead", each call a new CUDA-graph step; tensor outputs are copies.

    CUDA-graph trees overwrite a graph's outputs at its next replay; the
    training loop keeps a micro-batch's loss until the optimizer step, so
    outputs are cloned. Never run on a GPU yet.
    """

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(lambda o: o.clone() if torch.is_tensor(o) else o, self.compiled(*args, **kwargs))


def model_compiler(cfg, device: torch.device) -> Optional[Callable[[nn.Module], nn.Module]]:
    """What `Trainer(compile_fn=...)` gets for a TrainConfig's `compile`, `compile_backend`, `compile_mode`.

    None for eager. The backend and mode are checked here, before any data is read or model built.
    """
    if not use_compile(cfg.compile, device):
        return None
    check_compile_backend(cfg.compile_backend)
    check_compile_mode(cfg.compile_mode, device, cfg.compile_backend)
    return lambda model: compile_model(model, cfg.compile_backend, cfg.compile_mode)


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
    cache = compile_cache_dir(cfg, info.device)
    try:
        configure_device(info.device, cfg.tf32)
        if info.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        if cache is not None:
            os.environ[CACHE_VARIABLE] = str(cache)
        yield info
    finally:
        torch.set_num_threads(threads)  # matters when called in-process (tests, notebooks)
        if cache is not None:
            os.environ.pop(CACHE_VARIABLE, None)
        distributed.cleanup()


CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir(cfg, device: torch.device) -> Optional[Path]:
    """OUTPUT_DIR/compile_cache when the run compiles with inductor and TORCHINDUCTOR_CACHE_DIR is unset; else None.

    Inductor keeps its compiled graphs and kernels there, keyed by graph,
    shapes, device and torch version, so a resumed or requeued run of the
    same output folder, on any node, loads them instead of generating and
    building them again; dynamo and AOTAutograd still trace the model (AOTAutograd's
    own cache skips graphs with custom autograd Functions, such as the depthwise
    conv's). On the 2-core CPU the first step of atto took 141 s cold and 21 s
    warm (BENCHMARKS.md). Set TORCHINDUCTOR_CACHE_DIR to share one cache between runs.
    """
    if CACHE_VARIABLE in os.environ or not use_compile(cfg.compile, device) or cfg.compile_backend != "inductor":
        return None
    return Path(cfg.output_dir).expanduser().absolute() / "compile_cache"
