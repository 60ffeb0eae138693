"""Converting checkpoints to timm-named dense ConvNeXt V2 weights: formats, checks, verification, files.

`convert` recognises the input format from its keys (FORMATS; see
finetune.convert for what each holds), renames through
fcmae.weights.layouts, infers the architecture and checks every name and
shape against timm's. `verify` compares the sparse encoder with the dense
model; `load_weights` and `write_output` read and write the files.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.models.convnext import ConvNeXt

import sparse
from fcmae.runtime.checkpoint import save_atomic
from fcmae.weights.hf import save_hf
from fcmae.weights.io import SAFETENSORS_SUFFIX, WeightsError, read_weights, write_weights
from fcmae.weights.layouts import (
    ConversionError,
    StateDict,
    drop_reason,
    reference_fcmae_to_reference,
    reference_to_timm,
    to_encoder,
    to_reference,
)
from sparse.sizes import MODEL_SIZES, TIMM_CONV_MLP_SIZES, check_size, size_of

FORMATS = ("fcmae", "encoder", "reference-fcmae", "reference")
OUTPUT_FORMATS = ("timm", "reference", "hf")

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


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
                dropped[key] = drop_reason(key)
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

    return ConvNeXt(depths=tuple(depths), dims=tuple(dims), use_grn=True, ls_init_value=None, conv_mlp=conv_mlp,
                    num_classes=num_classes, **kwargs)


@torch.no_grad()
def verify(conversion: Conversion, image_size: int = 64, seed: int = 0) -> float:
    """Max |sparse encoder - dense timm model| of the features of one random image with no mask.

    Raises ConversionError when the difference exceeds 1e-4 of the features' scale.
    """

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

    try:
        obj = read_weights(path)  # safetensors or torch.load(weights_only=True): never runs code from the file
    except WeightsError as e:
        raise ConversionError(str(e)) from None
    try:
        return convert(obj, size=size)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


def output_object(conversion: Conversion, fmt: str):
    """What gets written for `--format fmt` (timm or reference; hf is a folder, see fcmae.weights.hf)."""
    if fmt == "timm":
        return conversion.state_dict
    if fmt == "reference":
        return {"model": to_reference(conversion.state_dict)}
    raise ConversionError(f"unknown output format {fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")


def write_output(conversion: Conversion, fmt: str, output) -> str:
    """Write the converted weights; returns how they were written. A .safetensors OUT is written as such."""

    if fmt == "hf":
        save_hf(conversion, output)
        return "Hugging Face ConvNextV2Model folder: config.json, model.safetensors"
    if str(output).endswith(SAFETENSORS_SUFFIX):
        if fmt != "timm":
            raise ConversionError(f"--format {fmt} writes a {{'model': ...}} checkpoint, which safetensors cannot "
                                  "hold; use a .pth output, or --format timm")
        write_weights(conversion.state_dict, output, metadata={"format": "pt"})
        return "timm layout, safetensors"

    save_atomic(output_object(conversion, fmt), output)
    return f"{fmt} layout"
