"""Learning rate per optimizer step: linear warmup, then cosine decay to `min_lr`.

Param groups may carry an `lr_scale` (e.g. layer-wise decay in fine-tuning);
`set_lr` multiplies by it.
"""

import math


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """lr at optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly from base_lr/warmup_steps (step 0) to base_lr; the
    cosine then falls from base_lr to min_lr at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's lr to lr * group's `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
