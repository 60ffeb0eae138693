"""The fine-tuned classifier: timm's dense `convnextv2_<size>`, and loading pre-trained weights into it."""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import timm
import torch
import torch.nn as nn

from fcmae.weights.conversion import Conversion, build_dense, convert, describe_arch, uses_conv_mlp
from fcmae.weights.io import WeightsError, read_weights
from fcmae.weights.layouts import ConversionError
from sparse.sizes import check_size, resolve_arch, size_of


def build_model(size: str, num_classes: int, drop_path: float = 0.0, head_init_scale: float = 1.0,
                depths: Optional[Sequence[int]] = None, dims: Optional[Sequence[int]] = None,
                in_chans: int = 3) -> nn.Module:
    """timm's ConvNeXt V2 of `size` (depths/dims override it, e.g. for tests) with a fresh head.

    `head_init_scale` multiplies the initial head weights and biases (the
    recipes use 0.001); `drop_path` is the stochastic-depth rate of the last
    block (linearly increasing from 0); `in_chans` the image channels of the stem.
    """
    name = check_size(size)
    depths, dims = resolve_arch(name, depths, dims)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path, head_init_scale=head_init_scale,
                  in_chans=in_chans)
    if size_of(depths, dims) == name:
        model = timm.create_model(f"convnextv2_{name}", **kwargs)
    else:
        model = build_dense(depths, dims, conv_mlp=uses_conv_mlp(size_of(depths, dims)), **kwargs)
    model.arch = (tuple(depths), tuple(dims))
    return model


@dataclass
class LoadReport:
    """What `load_pretrained` did; `lines()` is what the command prints."""

    path: str
    source_format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # the model's keys the file did not provide (left as initialised)
    unexpected: List[str] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # key -> why it was not loaded

    def lines(self) -> List[str]:
        out = [f"pre-trained weights: {self.path} ({self.source_format})",
               f"  loaded      {len(self.loaded)} tensors"]
        out.append(f"  missing     {len(self.missing)} (newly initialised): {', '.join(self.missing) or 'none'}")
        out.append(f"  unexpected  {len(self.unexpected)}: {', '.join(self.unexpected) or 'none'}")
        reasons = {}
        for key, reason in self.dropped.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            out.append(f"  dropped     {len(keys)} ({shown}): {reason}")
        return out


def load_pretrained(model: nn.Module, checkpoint, path: str = "<checkpoint>",
                    purpose: str = "the model to fine-tune") -> LoadReport:
    """Load an FCMAE checkpoint (converted on the fly), converted weights, or a classifier checkpoint.

    `checkpoint` is the loaded object, or the `Conversion` of it that the
    caller has already made (with the model's conv_mlp; not converted again).
    The architecture must match the model's (a clear error otherwise). Head
    weights of another class count are dropped (the head stays freshly
    initialised); every other tensor must fit. `purpose` names the model in the messages.
    """
    depths, dims = model.arch
    conv_mlp = uses_conv_mlp(size_of(depths, dims))
    if isinstance(checkpoint, Conversion):
        conversion = checkpoint
    else:
        try:
            conversion = convert(checkpoint, conv_mlp=conv_mlp)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
    if (conversion.depths, conversion.dims) != (tuple(depths), tuple(dims)):
        raise ConversionError(
            f"size mismatch: {path} holds {describe_arch(conversion.depths, conversion.dims)}, but {purpose} "
            f"is {describe_arch(depths, dims)}; pass the checkpoint's size or another checkpoint")
    in_chans = model.stem[0].in_channels
    if conversion.in_chans != in_chans:
        raise ConversionError(f"{path} has a stem for {conversion.in_chans} input channel(s), but {purpose} "
                              f"has in_chans={in_chans}; fcmae-finetune: set --in_chans "
                              f"{conversion.in_chans} (the images' channel count must match the pre-training's); "
                              "fcmae-knn and fcmae-linprobe read in_chans from the config stored in the checkpoint "
                              "(3 without one, as in converted files): give them the training checkpoint")
    weights = dict(conversion.state_dict)
    dropped = dict(conversion.dropped)
    own = model.state_dict()
    for key in [k for k in weights if k.startswith("head.")]:
        if key not in own or own[key].shape != weights[key].shape:
            dropped[key] = f"the head has another shape here ({tuple(weights[key].shape)} in the file)"
            del weights[key]
    result = model.load_state_dict(weights, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("head.")]
    if bad or result.unexpected_keys:
        raise ConversionError(f"{path}: weights do not fit the model: missing {bad}, unexpected "
                              f"{result.unexpected_keys}")
    return LoadReport(path, conversion.source_format, sorted(weights), list(result.missing_keys),
                      list(result.unexpected_keys), dropped)


def read_pretrained(path) -> dict:
    """Read pre-trained weights from outside safely (fcmae.weights.io); errors as ConversionError.

    A .safetensors file, or a torch file read with weights_only=True: a file
    whose unpickling would run code is refused, and none of its code runs.
    """
    try:
        return read_weights(path)
    except WeightsError as e:
        raise ConversionError(str(e)) from None


def load_backbone(checkpoint: Optional[str], size: Optional[str] = None, depths: Optional[Sequence[int]] = None,
                  dims: Optional[Sequence[int]] = None, seed: int = 0, in_chans: int = 3,
                  weights: Optional[dict] = None, purpose: str = "the model to evaluate") -> nn.Module:
    """A dense ConvNeXt V2 without classifier (num_classes=0) for feature extraction, in eval mode.

    `checkpoint`: an FCMAE checkpoint, converted (timm, reference, .safetensors)
    weights, or None / "none" for random weights (seeded by `seed`); `weights`: its contents when the caller
    has read it already (`read_pretrained`). The architecture is the checkpoint's unless `size` (and
    depths/dims) is given, in which case a checkpoint of another size is a clear error; so is a stem for other
    than `in_chans` channels. The errors name the model by `purpose`.
    """

    if checkpoint is None or str(checkpoint).lower() == "none":
        torch.manual_seed(seed)
        return build_model(size or "atto", 0, depths=depths, dims=dims, in_chans=in_chans).eval()
    state = read_pretrained(checkpoint) if weights is None else weights
    if size is None and depths is None and dims is None:
        try:
            state = convert(state)  # the architecture is the file's; the model's conv_mlp is the default's
        except ConversionError as e:
            raise ConversionError(f"{checkpoint}: {e}") from None
        size, depths, dims = state.size or "atto", state.depths, state.dims
    model = build_model(size or "atto", 0, depths=depths, dims=dims, in_chans=in_chans)
    load_pretrained(model, state, str(checkpoint), purpose)
    return model.eval()
