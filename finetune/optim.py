"""AdamW with layer-wise learning-rate decay for ConvNeXt V2 (timm parameter names).

Layer ids (docs/PUBLISHED_SETTINGS.md), the head last; a parameter of layer id i gets
lr * layer_decay ** (head_id - i):

- 'single': every block is its own layer; the downsample layer in front of
  stage i shares the id of that stage's first block, and so does the stem
  (the reference release's downsample_layers.0), with stage 0: id 1. With
  depths d: block j of stage i -> 1 + d0 + ... + d(i-1) + j; head -> sum(d) + 1.
- 'group' (the recipe of base, large and huge): stage 0 is one layer, stage 1
  with its downsample one layer, the downsample of stage 2 one layer, the
  blocks of stage 2 in groups of three consecutive blocks, stage 3 with its
  downsample one layer. For 3-3-27-3: stem 0, stage 0 -> 1, stage 1 -> 2,
  stage 2 -> 3 .. 11, stage 3 -> 12, head -> 13.

No weight decay on biases and on one-dimensional parameters (norm weights,
GRN gamma and beta).
"""

import math
import re
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from fcmae.runtime.device import adamw_fused

LAYER_DECAY_TYPES = ("single", "group")
_STAGE = re.compile(r"^stages\.(\d+)\.(downsample|blocks\.(\d+))\.")


def head_layer_id(depths: Sequence[int], rule: str) -> int:
    """The id of the head: the largest layer id."""
    if rule == "single":
        return sum(depths) + 1
    if rule == "group":
        return 3 + math.ceil(depths[2] / 3) + 1
    raise ValueError(f"unknown layer_decay_type {rule!r}; choose one of: {', '.join(LAYER_DECAY_TYPES)}")


def layer_id(name: str, depths: Sequence[int], rule: str) -> int:
    """Layer id of parameter `name` under `rule` ('single' or 'group'); see the module docstring."""
    head = head_layer_id(depths, rule)
    if name.startswith("stem."):
        return 1 if rule == "single" else 0
    match = _STAGE.match(name)
    if not match:
        return head  # head.norm, head.fc
    stage = int(match.group(1))
    block = int(match.group(3)) if match.group(3) is not None else 0  # downsample: with block 0
    if rule == "single":
        return 1 + sum(depths[:stage]) + block
    if stage < 2:
        return stage + 1
    if stage == 2:
        return 3 + block // 3 if match.group(3) is not None else 3
    return head - 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float, depths: Sequence[int],
                 rule: str = "single") -> List[Dict]:
    """Parameter groups with `lr_scale` (layer decay) and `weight_decay` (0 for biases and 1-d weights)."""
    head = head_layer_id(depths, rule)
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, depths, rule)
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "layer_id": lid,
                           "lr_scale": float(layer_decay) ** (head - lid),
                           "weight_decay": 0.0 if no_decay else float(weight_decay)}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float, depths: Sequence[int],
                    rule: str = "single", betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; the lr of each group is lr * lr_scale (fcmae.runtime.plan.set_lr keeps it so);
    fused when every parameter is on one CUDA or CPU device."""
    groups = param_groups(model, weight_decay, layer_decay, depths, rule)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=adamw_fused(model))
