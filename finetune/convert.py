"""Sparse (FCMAE) checkpoints -> dense ConvNeXt V2 weights.

    fcmae-convert IN OUT [--format timm|reference|hf] [--size SIZE] [--verify | --no-verify]
    python -m finetune.convert IN OUT ...
    launch/convert.sh IN OUT ...

Input formats, recognised from the keys (inside a {'model': ...} training
checkpoint or bare):

  fcmae            this project's FCMAE model: encoder.stem.0.weight, ...,
                   proj.*, mask_token, decoder.*, pred.*
  encoder          this project's sparse encoder, or a timm convnextv2
                   state dict (the same names): stem.0.weight, stages.i.*
  reference-fcmae  the reference release's FCMAE checkpoints (MinkowskiEngine
                   layout): encoder.downsample_layers.*, encoder.stages.s.b.*,
                   .kernel tensors of shape (K*K, C_in, C_out) or (K*K, C)
  reference        the reference release's dense ConvNeXt V2 layout:
                   downsample_layers.*, stages.s.b.dwconv, pwconv1, grn.gamma ...

Output: a timm `convnextv2_<size>` state dict (default), loadable with

    timm.create_model("convnextv2_atto", pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file=OUT, num_classes=0))

(only the head, `head.norm` and `head.fc`, is new), or with --format reference
the reference release's dense layout, {'model': state_dict}, as its
fine-tuning code reads it, or with --format hf a folder (config.json,
model.safetensors) for `transformers.ConvNextV2Model.from_pretrained`
(finetune/hf.py). An OUT ending in .safetensors is written in that format.
Inputs are read by finetune/weights.py: safetensors, or
torch.load(weights_only=True), so a file that would run code is refused.
The FCMAE decoder (proj, mask_token, decoder, pred) is dropped and
reported: fine-tuning does not use it.

All name and layout knowledge lives in this module; everything goes through
the timm naming, which is also the sparse encoder's (sparse/encoder.py).
"""

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sparse.minkowski import conv_from_me, conv_to_me, depthwise_from_me, depthwise_to_me, me_kernel_permutation
from sparse.sizes import MODEL_SIZES, TIMM_CONV_MLP_SIZES, check_size, size_of

__all__ = [
    "Conversion", "ConversionError", "FORMATS", "OUTPUT_FORMATS", "convert", "dense_to_me_kernel", "detect_format",
    "expected_shapes", "infer_arch", "load_weights", "me_kernel_permutation", "me_kernel_to_dense", "to_encoder",
    "to_reference", "to_reference_fcmae", "to_timm", "verify", "main",
]

StateDict = Dict[str, torch.Tensor]

FORMATS = ("fcmae", "encoder", "reference-fcmae", "reference")
OUTPUT_FORMATS = ("timm", "reference", "hf")
DECODER_PREFIXES = ("proj.", "mask_token", "decoder.", "pred.")
DECODER_REASON = "the FCMAE decoder (proj, mask_token, decoder, pred) is used only in pre-training"
# --verify runs by default below this many encoder parameters (atto .. base: < 90M).
VERIFY_BY_DEFAULT_MAX_PARAMS = 100_000_000

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


class ConversionError(ValueError):
    """An input that cannot be converted; the message says what was found and what was expected."""


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
    so the conversion is exact; tests/test_convert.py checks it against a
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


# ---------------------------------------------------------------- containers and formats
def unwrap(obj) -> Tuple[StateDict, str]:
    """The state dict inside a checkpoint object, and a description of the container."""
    if not isinstance(obj, dict):
        raise ConversionError(f"expected a checkpoint dict or a state dict, found a {type(obj).__name__}")
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
            extra = sorted(k for k in obj if k != key)
            kind = "training checkpoint" if extra else "checkpoint"
            return inner, f"{kind} ({key!r}" + (f"; also {', '.join(map(str, extra[:6]))}" if extra else "") + ")"
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if tensors and len(tensors) == len(obj):
        return tensors, "bare state dict"
    raise ConversionError(
        "found no weights: expected a state dict of tensors, or a checkpoint with one under 'model' "
        f"(top-level keys found: {', '.join(map(str, list(obj)[:10])) or 'none'})"
    )


def detect_format(state_dict: StateDict) -> str:
    """One of FORMATS, from the stem's key; a clear error naming what was found otherwise."""
    keys = set(state_dict)
    if "encoder.downsample_layers.0.0.weight" in keys:
        return "reference-fcmae"
    if "encoder.stem.0.weight" in keys:
        return "fcmae"
    if "stem.0.weight" in keys:
        return "encoder"
    if "downsample_layers.0.0.weight" in keys:
        return "reference"
    sample = ", ".join(sorted(keys)[:8])
    raise ConversionError(
        "unrecognised weights: none of the known stem keys was found (encoder.stem.0.weight: this project's "
        "FCMAE; stem.0.weight: encoder / timm; encoder.downsample_layers.0.0.weight: reference FCMAE; "
        f"downsample_layers.0.0.weight: reference dense). Found {len(keys)} keys, e.g. {sample}"
    )


# ---------------------------------------------------------------- architecture
def infer_arch(state_dict: StateDict) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Depths and dims of the encoder whose (timm-named) weights these are."""
    depths = [0, 0, 0, 0]
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            if stage > 3:
                raise ConversionError(f"ConvNeXt V2 has 4 stages, found key {key!r}")
            depths[stage] = max(depths[stage], block + 1)
    missing = [i for i in range(4) if f"stages.{i}.blocks.0.conv_dw.weight" not in state_dict]
    if missing:
        raise ConversionError(f"incomplete weights: no blocks found for stage(s) {missing} (e.g. "
                              f"stages.{missing[0]}.blocks.0.conv_dw.weight is missing)")
    dims = [int(state_dict[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(4)]
    return tuple(depths), tuple(dims)


def expected_shapes(depths: Sequence[int], dims: Sequence[int], conv_mlp: bool, head_classes: int = 0,
                    in_chans: int = 3) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of timm's ConvNeXt V2 encoder (plus the head when head_classes > 0)."""
    shapes = {"stem.0.weight": (dims[0], in_chans, 4, 4), "stem.0.bias": (dims[0],),
              "stem.1.weight": (dims[0],), "stem.1.bias": (dims[0],)}
    fc = (lambda o, i: (o, i, 1, 1)) if conv_mlp else (lambda o, i: (o, i))
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i > 0:
            p = f"stages.{i}.downsample."
            shapes.update({p + "0.weight": (dims[i - 1],), p + "0.bias": (dims[i - 1],),
                           p + "1.weight": (dim, dims[i - 1], 2, 2), p + "1.bias": (dim,)})
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            shapes.update({
                p + "conv_dw.weight": (dim, 1, 7, 7), p + "conv_dw.bias": (dim,),
                p + "norm.weight": (dim,), p + "norm.bias": (dim,),
                p + "mlp.fc1.weight": fc(4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.grn.weight": (4 * dim,), p + "mlp.grn.bias": (4 * dim,),
                p + "mlp.fc2.weight": fc(dim, 4 * dim), p + "mlp.fc2.bias": (dim,),
            })
    if head_classes:
        shapes.update({"head.norm.weight": (dims[-1],), "head.norm.bias": (dims[-1],),
                       "head.fc.weight": (head_classes, dims[-1]), "head.fc.bias": (head_classes,)})
    return shapes


def uses_conv_mlp(size: Optional[str]) -> bool:
    """timm builds the block MLPs of atto, femto, pico and nano as 1x1 convs."""
    return size in TIMM_CONV_MLP_SIZES


def describe_arch(depths, dims) -> str:
    size = size_of(depths, dims)
    arch = f"depths {list(depths)}, dims {list(dims)}"
    return f"convnextv2_{size} ({arch})" if size else f"a custom ConvNeXt V2 ({arch})"


# ---------------------------------------------------------------- layout mappings
def _vector(value: torch.Tensor) -> torch.Tensor:
    """(1, C), (1, 1, 1, C) or (C,) -> (C,)."""
    return value.reshape(-1)


def _drop_reason(key: str) -> str:
    """Why a key outside the encoder of an FCMAE checkpoint is left out."""
    return DECODER_REASON if key.startswith(DECODER_PREFIXES) else "not part of the encoder"


def reference_fcmae_to_reference(state_dict: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """Reference FCMAE (MinkowskiEngine layout) -> reference dense layout; returns (weights, dropped)."""
    out, dropped = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("encoder."):
            dropped[key] = _drop_reason(key)
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
        k = key
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        k = k.replace(".grn.gamma", ".mlp.grn.weight").replace(".grn.beta", ".mlp.grn.bias")
        k = re.sub(r"^norm\.", "head.norm.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        if ".mlp.grn." in k:
            value = _vector(value)
        out[k] = value
    return out


def to_reference(timm_state: StateDict) -> StateDict:
    """timm names -> the reference release's dense ConvNeXt V2 layout (models/convnextv2.py)."""
    out = {}
    for key, value in timm_state.items():
        k = key
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        if ".mlp.grn." in k:
            k = k.replace(".mlp.grn.weight", ".grn.gamma").replace(".mlp.grn.bias", ".grn.beta")
            value = value.reshape(1, 1, 1, -1)
        if re.search(r"\.pwconv[12]\.weight$", k) and value.dim() == 4:
            value = value.flatten(1)
        k = re.sub(r"^head\.norm\.", "norm.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
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


# ---------------------------------------------------------------- conversion
@dataclass
class Conversion:
    """What `convert` produced: timm-named weights and an account of what happened."""

    state_dict: StateDict
    source_format: str
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    conv_mlp: bool
    dropped: Dict[str, str] = field(default_factory=dict)  # key -> why it was left out
    container: str = "bare state dict"
    in_chans: int = 3  # input channels of the stem: timm.create_model(..., in_chans=in_chans) loads it

    @property
    def size(self) -> Optional[str]:
        return size_of(self.depths, self.dims)

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.state_dict.values())

    def dropped_summary(self) -> List[str]:
        """One line per reason: the reason, and the dropped keys grouped by their first name part."""
        by_reason: Dict[str, Dict[str, int]] = {}
        for key, reason in self.dropped.items():
            head = key.split(".")[0] + (".*" if "." in key else "")
            groups = by_reason.setdefault(reason, {})
            groups[head] = groups.get(head, 0) + 1
        return [f"{sum(g.values())} key(s) {', '.join(f'{h} ({n})' for h, n in g.items())}: {reason}"
                for reason, g in by_reason.items()]


def convert(obj, conv_mlp: Optional[bool] = None, size: Optional[str] = None) -> Conversion:
    """Any supported checkpoint object or state dict -> timm-named dense weights, checked.

    `conv_mlp`: whether the target builds block MLPs as 1x1 convs; default:
    as timm does for the inferred size. `size`: the expected size; a
    mismatch is an error naming both.
    """
    state_dict, container = unwrap(obj)
    source = detect_format(state_dict)
    dropped: Dict[str, str] = {}
    if source == "reference-fcmae":
        state_dict, dropped = reference_fcmae_to_reference(state_dict)
        weights = reference_to_timm(state_dict)
    elif source == "reference":
        weights = reference_to_timm(state_dict)
    elif source == "fcmae":  # timm names under encoder.
        weights = {}
        for key, value in state_dict.items():
            if key.startswith("encoder."):
                weights[key[len("encoder."):]] = value
            else:
                dropped[key] = _drop_reason(key)
    else:  # encoder: already timm names
        weights = dict(state_dict)
    for key in [k for k in weights if k.startswith("head.") and source in ("fcmae", "reference-fcmae")]:
        dropped[key] = "not part of the encoder"
        del weights[key]

    depths, dims = infer_arch(weights)
    inferred = size_of(depths, dims)
    if size is not None:
        wanted = check_size(size)
        if inferred != wanted:
            raise ConversionError(
                f"size mismatch: the checkpoint holds {describe_arch(depths, dims)}, but convnextv2_{wanted} "
                f"(depths {list(MODEL_SIZES[wanted][0])}, dims {list(MODEL_SIZES[wanted][1])}) was asked for"
            )
    if conv_mlp is None:
        conv_mlp = uses_conv_mlp(inferred)
    out = {}
    for key, value in weights.items():
        if re.search(r"\.mlp\.fc[12]\.weight$", key):
            value = value.reshape(*value.shape[:2], 1, 1) if conv_mlp else value.reshape(value.shape[0], -1)
        out[key] = value
    head_classes = int(out["head.fc.weight"].shape[0]) if "head.fc.weight" in out else 0
    stem = out.get("stem.0.weight")
    in_chans = int(stem.shape[1]) if stem is not None and stem.dim() == 4 else 3
    _check_complete(out, expected_shapes(depths, dims, conv_mlp, head_classes, in_chans), source)
    return Conversion(out, source, depths, dims, conv_mlp, dropped, container, in_chans=in_chans)


def _check_complete(weights: StateDict, expected: Dict[str, Tuple[int, ...]], source: str) -> None:
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and not k.startswith("head.")]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {expected[k]})" for k in expected
             if k in weights and tuple(weights[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise ConversionError(f"the {source} weights do not form a ConvNeXt V2 encoder (after renaming to "
                              f"timm's names): {'; '.join(problems)}")


def to_timm(state_dict, conv_mlp: Optional[bool] = None) -> StateDict:
    """A state dict that timm's `convnextv2_<size>` loads with only the head missing.

    Takes any input format of this module (checkpoint dicts too). `conv_mlp`
    says whether the target builds its block MLPs as 1x1 convs (timm does for
    atto, femto, pico and nano); by default it follows the inferred size.
    """
    return convert(state_dict, conv_mlp=conv_mlp).state_dict


# ---------------------------------------------------------------- verification
def build_dense(depths, dims, conv_mlp: bool, num_classes: int = 0, **kwargs) -> torch.nn.Module:
    """timm's ConvNeXt V2 with these depths and dims (what `convnextv2_<size>` builds)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=tuple(depths), dims=tuple(dims), use_grn=True, ls_init_value=None, conv_mlp=conv_mlp,
                    num_classes=num_classes, **kwargs)


@torch.no_grad()
def verify(conversion: Conversion, image_size: int = 64, seed: int = 0) -> float:
    """Max |sparse encoder - dense timm model| of the features of one random image with no mask.

    Raises ConversionError when the difference exceeds 1e-4 of the features' scale.
    """
    import sparse

    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(1, conversion.in_chans, image_size, image_size, generator=gen)
    encoder = sparse.build_encoder(conversion.size or "atto", depths=conversion.depths, dims=conversion.dims,
                                   in_chans=conversion.in_chans).eval()
    encoder.load_state_dict(to_encoder(conversion.state_dict), strict=True)
    dense = build_dense(conversion.depths, conversion.dims, conversion.conv_mlp, in_chans=conversion.in_chans).eval()
    missing, unexpected = dense.load_state_dict(conversion.state_dict, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ConversionError(f"the dense model did not take the weights: missing {missing}, unexpected {unexpected}")
    a, b = encoder(imgs), dense.forward_features(imgs)
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    if not diff <= 1e-4 * max(scale, 1.0):
        raise ConversionError(f"verification failed: sparse and dense features differ by {diff:.3g} "
                              f"(feature scale {scale:.3g})")
    return diff


# ---------------------------------------------------------------- files
def load_weights(path, size: Optional[str] = None) -> Conversion:
    """Read a checkpoint file and convert it; clear errors for missing, truncated or foreign files."""
    from finetune.weights import WeightsError, read_weights

    try:
        obj = read_weights(path)  # safetensors or torch.load(weights_only=True): never runs code from the file
    except WeightsError as e:
        raise ConversionError(str(e)) from None
    try:
        return convert(obj, size=size)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


def output_object(conversion: Conversion, fmt: str):
    """What gets written for `--format fmt` (timm or reference; hf is a folder, see finetune/hf.py)."""
    if fmt == "timm":
        return conversion.state_dict
    if fmt == "reference":
        return {"model": to_reference(conversion.state_dict)}
    raise ConversionError(f"unknown output format {fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")


def write_output(conversion: Conversion, fmt: str, output) -> str:
    """Write the converted weights; returns how they were written. A .safetensors OUT is written as such."""
    from finetune.weights import SAFETENSORS_SUFFIX, write_weights

    if fmt == "hf":
        from finetune.hf import save_hf

        save_hf(conversion, output)
        return "Hugging Face ConvNextV2Model folder: config.json, model.safetensors"
    if str(output).endswith(SAFETENSORS_SUFFIX):
        if fmt != "timm":
            raise ConversionError(f"--format {fmt} writes a {{'model': ...}} checkpoint, which safetensors cannot "
                                  "hold; use a .pth output, or --format timm")
        write_weights(conversion.state_dict, output, metadata={"format": "pt"})
        return "timm layout, safetensors"
    from fcmae.runtime.checkpoint import save_atomic

    save_atomic(output_object(conversion, fmt), output)
    return f"{fmt} layout"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fcmae-convert",
        description="Convert an FCMAE / sparse ConvNeXt V2 checkpoint into dense ConvNeXt V2 weights.",
        epilog="Input formats (detected): " + ", ".join(FORMATS) + ". See finetune/convert.py.")
    p.add_argument("input", help="checkpoint or state dict (.pth / .pt)")
    p.add_argument("output", help="file to write (atomically); a name ending in .safetensors is written in "
                                  "that format; with --format hf, a folder")
    p.add_argument("--format", default="timm", choices=OUTPUT_FORMATS,
                   help="timm: a timm convnextv2_<size> state dict (default); reference: the reference "
                        "release's dense layout, {'model': state_dict}; hf: a folder that "
                        "transformers.ConvNextV2Model.from_pretrained loads")
    p.add_argument("--size", default=None, help="expected size (atto ... huge); an error if the weights differ")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--verify", dest="verify", action="store_true", default=None,
                       help="check that the sparse encoder and the dense model give the same features "
                            "(default: on below 100M parameters)")
    group.add_argument("--no-verify", "--no_verify", dest="verify", action="store_false")
    return p.parse_args(argv)


def run(args) -> int:
    from fcmae.runtime.files import remove_stale_temporaries

    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ConversionError("the output would overwrite the input; choose another output path")
    if args.size is not None:
        try:
            check_size(args.size)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    # Temporaries of earlier conversions to the same file that were killed mid-write (this host's dead processes).
    remove_stale_temporaries(Path(args.output).parent, name=Path(args.output).name, all_hosts=False)
    conversion = load_weights(args.input, size=args.size)
    print(f"input    {args.input}: {conversion.source_format} weights, {conversion.container}")
    print(f"model    {describe_arch(conversion.depths, conversion.dims)}, "
          f"{conversion.num_params / 1e6:.2f}M parameters converted")
    for line in conversion.dropped_summary():
        print(f"dropped  {line}")
    do_verify = args.verify if args.verify is not None else conversion.num_params < VERIFY_BY_DEFAULT_MAX_PARAMS
    if do_verify:
        diff = verify(conversion)
        print(f"verify   sparse encoder vs dense model, random 64x64 image, no mask: max |diff| = {diff:.3g}")
    else:
        print("verify   skipped" + ("" if args.verify is False else " (large model; --verify forces it)"))
    how = write_output(conversion, args.format, args.output)
    name = f"convnextv2_{conversion.size}" if conversion.size else "ConvNeXt(...)"
    hint = "" if args.format == "hf" else f"; load it into {name}: only the head is new"
    print(f"wrote    {args.output} ({how}{hint})")
    return 0


def main(argv=None) -> None:
    """Exit codes: 0 written, 2 bad input (usage, a checkpoint that cannot be converted), 4 disk full."""
    from fcmae.runtime.files import DiskFullError

    args = parse_args(argv)
    try:
        sys.exit(run(args))
    except ConversionError as e:
        print(f"fcmae-convert: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except DiskFullError as e:
        print(f"fcmae-convert: error: {e}", file=sys.stderr, flush=True)
        sys.exit(4)


if __name__ == "__main__":
    main()
