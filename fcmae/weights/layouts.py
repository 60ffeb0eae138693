"""Names and tensor layouts of ConvNeXt V2 weights: the reference release's (dense and
MinkowskiEngine), timm's and the sparse encoder's, and the mappings between them.

Everything goes through the timm naming, which is also the sparse encoder's
(sparse.encoder). Formats are detected and checked in fcmae.weights.conversion;
docs/PUBLISHED_SETTINGS.md describes the reference layouts.
"""

import re
from functools import lru_cache
from typing import Dict, Tuple

import torch

from sparse.minkowski import conv_from_me, conv_to_me, depthwise_from_me, depthwise_to_me

StateDict = Dict[str, torch.Tensor]

DECODER_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.")
DECODER_REASON = "the FCMAE decoder (proj, mask_token, decoder, pred) is used only in pre-training"

# The renames between the reference release's dense names (left) and timm's (right), read left to right
# by `reference_to_timm` and right to left by `to_reference`. {i} and {j} stand for stage and block numbers.
PREFIX_RENAMES = (  # the start of a name (a whole name where it ends without '.'); the first match renames it
    ("downsample_layers.0.", "stem."),
    ("downsample_layers.{i}.", "stages.{i}.downsample."),
    ("stages.{i}.{j}.", "stages.{i}.blocks.{j}."),
    ("norm.", "head.norm."),
    ("head.weight", "head.fc.weight"),
    ("head.bias", "head.fc.bias"),
)
PART_RENAMES = (  # parts inside a name, each replaced wherever it stands
    (".dwconv.", ".conv_dw."),
    (".pwconv1.", ".mlp.fc1."),
    (".pwconv2.", ".mlp.fc2."),
    (".grn.gamma", ".mlp.grn.weight"),
    (".grn.beta", ".mlp.grn.bias"),
)


class ConversionError(ValueError):
    """An input that cannot be converted; the message says what was found and what was expected."""

    exit_code = 2  # bad input, as fcmae.runtime.errors.UsageError


# ---------------------------------------------------------------- MinkowskiEngine kernel layout
def me_kernel_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """A MinkowskiEngine 2D kernel -> the torch conv weight that computes the same function.

    (K*K, C_in, C_out) (MinkowskiConvolution)        -> (C_out, C_in, K, K)
    (K*K, C)           (channel-wise / depthwise)     -> (C, 1, K, K)

    The order of ME's kernel offsets is defined once, in
    `sparse.minkowski.me_kernel_permutation`: ME enumerates a hypercube
    kernel with the FIRST coordinate axis varying fastest, and the reference
    release's coordinates are (batch, y, x) (`to_sparse` of an (N, C, H, W)
    map), so ME's offset k is the tap (ky, kx) = (k % K, k // K), where torch
    stores it at ky * K + kx: a transpose of the spatial axes. Pure indexing,
    so the conversion is exact; tests/weights/test_convert.py checks it against a
    direct simulation of ME's convolution.
    """
    if kernel.dim() == 3:
        return conv_from_me(kernel)
    if kernel.dim() == 2:
        return depthwise_from_me(kernel)
    raise ConversionError(f"a MinkowskiEngine kernel is (K*K, C_in, C_out) or (K*K, C), got {tuple(kernel.shape)}")


def dense_to_me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `me_kernel_to_dense`: (C, 1, K, K) -> (K*K, C); (C_out, C_in, K, K) -> (K*K, C_in, C_out).

    A weight with one input channel per group is taken as depthwise; for a
    dense conv with C_in == 1 call `sparse.minkowski.conv_to_me` directly.
    """
    if weight.dim() != 4:
        raise ConversionError(f"expected a conv weight (C_out, C_in, K, K), got {tuple(weight.shape)}")
    return depthwise_to_me(weight) if weight.shape[1] == 1 else conv_to_me(weight)


# ---------------------------------------------------------------- renames
@lru_cache(maxsize=None)
def _prefix_pattern(template: str) -> "re.Pattern":
    """'stages.{i}.{j}.' -> a regex for that start of a name (groups i, j); 'head.weight' -> that name only."""
    pieces = re.split(r"\{(i|j)\}", template)  # text, group name, text, ...
    regex = "".join(re.escape(p) if n % 2 == 0 else rf"(?P<{p}>\d+)" for n, p in enumerate(pieces))
    return re.compile("^" + regex + ("" if template.endswith(".") else "$"))


def rename(key: str, reference_to_timm_names: bool) -> str:
    """A reference dense name -> timm's (True), or timm's -> the reference's (False), by the tables above."""
    for reference, timm in PREFIX_RENAMES:
        source, target = (reference, timm) if reference_to_timm_names else (timm, reference)
        match = _prefix_pattern(source).match(key)
        if match:
            key = target.format(**match.groupdict()) + key[match.end():]
            break
    for reference, timm in PART_RENAMES:
        source, target = (reference, timm) if reference_to_timm_names else (timm, reference)
        key = key.replace(source, target)
    return key


# ---------------------------------------------------------------- layout mappings
def _vector(value: torch.Tensor) -> torch.Tensor:
    """(1, C), (1, 1, 1, C) or (C,) -> (C,)."""
    return value.reshape(-1)


def drop_reason(key: str) -> str:
    """Why a key outside the encoder of an FCMAE checkpoint is left out."""
    return DECODER_REASON if key.startswith(DECODER_PREFIXES) else "not part of the encoder"


def reference_fcmae_to_reference(state_dict: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """Reference FCMAE (MinkowskiEngine layout) -> reference dense layout; returns (weights, dropped)."""
    out, dropped = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("encoder."):
            dropped[key] = drop_reason(key)
            continue
        k = key[len("encoder."):]
        if k.endswith(".kernel"):
            k = k[: -len(".kernel")] + ".weight"
            value = me_kernel_to_dense(value)
        elif k.endswith(".bias") and value.dim() == 2:  # ME conv biases are (1, C_out)
            value = _vector(value)
        k = k.replace(".ln.", ".").replace(".linear.", ".")
        if ".grn." in k:
            value = value.reshape(1, 1, 1, -1)
        out[k] = value
    return out, dropped


def reference_to_timm(state_dict: StateDict) -> StateDict:
    """Reference dense layout -> timm names (Linear MLP weights; `to_timm` fixes them for conv-MLP sizes)."""
    out = {}
    for key, value in state_dict.items():
        k = rename(key, reference_to_timm_names=True)
        if ".mlp.grn." in k:
            value = _vector(value)
        out[k] = value
    return out


def to_reference(timm_state: StateDict) -> StateDict:
    """timm names -> the reference release's dense ConvNeXt V2 layout (models/convnextv2.py)."""
    out = {}
    for key, value in timm_state.items():
        k = rename(key, reference_to_timm_names=False)
        if ".mlp.grn." in key:
            value = value.reshape(1, 1, 1, -1)
        if re.search(r"\.pwconv[12]\.weight$", k) and value.dim() == 4:
            value = value.flatten(1)
        out[k] = value
    return out


def to_reference_fcmae(timm_state: StateDict) -> StateDict:
    """timm-named encoder weights -> the reference FCMAE encoder's keys and MinkowskiEngine shapes.

    The inverse of the reference-fcmae input path (head weights are left
    out: the FCMAE encoder has none). Used to build test inputs in that
    layout from known dense weights.
    """
    out = {}
    for key, value in to_reference({k: v for k, v in timm_state.items() if not k.startswith("head.")}).items():
        k = key
        downsample = re.match(r"^downsample_layers\.([1-9]\d*)\.(\d)\.(weight|bias)$", k)
        if downsample:
            stage, part, name = downsample.groups()
            if part == "0":
                k = f"downsample_layers.{stage}.0.ln.{name}"
            elif name == "weight":
                k, value = f"downsample_layers.{stage}.1.kernel", dense_to_me_kernel(value)
            else:
                value = value.reshape(1, -1)
        elif k.endswith(".dwconv.weight"):
            k, value = k.replace(".dwconv.weight", ".dwconv.kernel"), dense_to_me_kernel(value)
        elif k.endswith(".dwconv.bias"):
            value = value.reshape(1, -1)
        elif ".norm." in k:
            k = k.replace(".norm.", ".norm.ln.")
        elif ".pwconv" in k:
            k = re.sub(r"\.(pwconv[12])\.", r".\1.linear.", k)
        elif ".grn." in k:
            value = value.reshape(1, -1)
        out["encoder." + k] = value.contiguous()
    return out


def to_encoder(timm_state: StateDict) -> StateDict:
    """timm-named weights -> the sparse encoder's state dict (Linear MLP weights, no head)."""
    out = {}
    for key, value in timm_state.items():
        if key.startswith("head."):
            continue
        if re.search(r"\.mlp\.fc[12]\.weight$", key) and value.dim() == 4:
            value = value.flatten(1)
        out[key] = value
    return out

