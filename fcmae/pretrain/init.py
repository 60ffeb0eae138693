"""Continued pre-training: a new FCMAE run that starts from the weights of a checkpoint (`--init CKPT`).

    fcmae-pretrain base 800ep --data_path /data/cells --in_chans 1 --init convnextv2_base_1k_224_fcmae.pt

The file is read safely, by the reader of every weight file from elsewhere
(fcmae.weights.io: .safetensors, or torch.load(weights_only=True), which
also admits the reference release's `args`, an argparse.Namespace); its
format is detected by finetune.convert:

- `fcmae`: this project's pre-training checkpoints (or the model's state
  dict): encoder and decoder.
- `reference-fcmae`: the reference release's FCMAE checkpoints
  (MinkowskiEngine layout): encoder and decoder (the reference's decoder is
  dense, with its ConvNeXt V2 block names, renamed here to timm's).
- `encoder`, `reference`: encoder weights only (this project's sparse
  encoder, timm's convnextv2, the reference's dense layout): the decoder keeps
  its fresh initialisation and a classifier head is left out; the log says so.

Only weights are taken: the optimizer, the learning-rate schedule, the epoch
count and the RNG start afresh, as in any new run.

Must match, else a one-line error naming the file: the encoder's depths and
dims (the size) and, when the file has a decoder, its width and depth
(decoder_dim, decoder_depth). Adapted when the file's stem has another number
of input channels than the run's in_chans: the stem kernel, the way timm
adapts input convolutions (`timm.models.adapt_input_conv`: summed over the
channels for 1 channel, else repeated or cut to in_chans channels and scaled
by (the file's channels)/in_chans; timm releases without its `base_chans`
argument adapt 3-channel stems only);
the prediction layer, which predicts 32*32*in_chans values per patch, then
starts fresh. The log says both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.models import adapt_input_conv

from fcmae.runtime.errors import UsageError
from fcmae.weights.conversion import convert, describe_arch, detect_format, unwrap
from fcmae.weights.io import WeightsError, read_weights
from fcmae.weights.layouts import DECODER_PREFIXES, ConversionError, reference_to_timm, to_encoder

StateDict = Dict[str, torch.Tensor]
STEM_KEY = "encoder.stem.0.weight"
PRED_KEYS = ("pred.weight", "pred.bias")
DECODER_FORMATS = ("fcmae", "reference-fcmae")


class InitError(UsageError):
    """An --init file that cannot start this run; the message is one line naming the file."""


@dataclass
class InitWeights:
    """The weights of an --init file in this project's FCMAE names.

    Args:
        path: the file.
        source_format: finetune.convert's name of its format.
        encoder: the sparse encoder's state dict (timm names, Linear MLP weights).
        decoder: proj, mask_token, decoder.<i>.*, pred.* (empty for an encoder-only file).
        depths, dims: the encoder's architecture.
        in_chans: input channels of the file's stem.
    """

    path: str
    source_format: str
    encoder: StateDict
    decoder: StateDict
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    in_chans: int

    @property
    def decoder_shape(self) -> Optional[Tuple[int, int]]:
        """(decoder_dim, decoder_depth) of the file's decoder, or None when it has none."""
        if not self.decoder:
            return None
        proj = self.decoder.get("proj.weight")
        blocks = {int(m.group(1)) for k in self.decoder for m in [re.match(r"^decoder\.(\d+)\.", k)] if m}
        return (int(proj.shape[0]) if proj is not None else 0), len(blocks)


def read_init(path) -> InitWeights:
    """Read and convert an --init file (see the module docstring); InitError for anything unusable."""

    try:  # tensors and plain types only (and the reference's `args`, a Namespace): no code from the file runs
        obj = read_weights(path)
    except WeightsError as e:
        raise InitError(f"--init: {e}") from None
    try:
        state, _ = unwrap(obj)
        source = detect_format(state)
        conversion = convert(obj, conv_mlp=False)
    except ConversionError as e:
        raise InitError(f"--init {path}: {e}") from None
    decoder = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)} if source in DECODER_FORMATS else {}
    if source == "reference-fcmae":
        decoder = reference_to_timm(decoder)  # dwconv, pwconv1/2, grn.gamma/beta -> timm's ConvNeXtBlock names
    return InitWeights(str(path), source, to_encoder(conversion.state_dict), decoder, conversion.depths,
                       conversion.dims, conversion.in_chans)


def check_fits(init: InitWeights, depths: Sequence[int], dims: Sequence[int], decoder_dim: int,
               decoder_depth: int) -> None:
    """InitError unless the file's encoder (and decoder, when it has one) has this run's shape."""

    if (tuple(init.depths), tuple(init.dims)) != (tuple(depths), tuple(dims)):
        raise InitError(f"--init {init.path} holds {describe_arch(init.depths, init.dims)}, but this run pre-trains "
                        f"{describe_arch(depths, dims)}: pass the checkpoint's size, or another --init")
    shape = init.decoder_shape
    if shape is not None and shape != (decoder_dim, decoder_depth):
        raise InitError(f"--init {init.path} has a decoder of {shape[1]} block(s) of width {shape[0]}, but this run's "
                        f"has {decoder_depth} of width {decoder_dim}: set --decoder_dim {shape[0]} --decoder_depth "
                        f"{shape[1]}, or use another --init")


def adapt_stem(weight: torch.Tensor, in_chans: int, path: str) -> Tuple[torch.Tensor, str]:
    """The stem kernel (O, C, 4, 4) adapted to in_chans input channels with timm's rule, and the rule in words."""

    source = int(weight.shape[1])
    rule = ("summed over its channels" if in_chans == 1
            else f"repeated or cut to {in_chans} channels and scaled by {source}/{in_chans}")
    try:
        if source == 3:
            return adapt_input_conv(in_chans, weight), rule
        return adapt_input_conv(in_chans, weight, base_chans=source), rule  # timm releases with base_chans
    except (TypeError, NotImplementedError, AssertionError):
        raise InitError(f"--init {path}: cannot adapt its {source}-channel stem to in_chans={in_chans} with this "
                        f"timm (it adapts 3-channel stems; newer releases any stem)") from None


def apply_init(model: torch.nn.Module, init: InitWeights) -> List[str]:
    """Load `init` into the FCMAE `model` (adapting the stem, see the module docstring); returns the log lines."""
    weights = {f"encoder.{k}": v for k, v in init.encoder.items()}
    weights.update(init.decoder)
    notes, fresh = [], set()  # fresh: the model's keys that keep their initialisation
    if init.in_chans != model.in_chans:
        weights[STEM_KEY], rule = adapt_stem(weights[STEM_KEY], model.in_chans, init.path)
        notes.append(f"  stem adapted from {init.in_chans} to {model.in_chans} input channel(s) as timm adapts "
                     f"input convolutions ({rule})")
        if init.decoder:
            for key in PRED_KEYS:
                weights.pop(key, None)
            fresh.update(PRED_KEYS)
            notes.append(f"  pred newly initialised: it predicts 32x32x{model.in_chans} values per patch here, "
                         f"32x32x{init.in_chans} in the file")
    if not init.decoder:
        fresh.update(k for k in model.state_dict() if not k.startswith("encoder."))
        notes.append(f"  decoder (proj, mask_token, decoder, pred) newly initialised: the file holds "
                     f"{init.source_format} weights, an encoder only")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and own[k].shape != v.shape]
    unexpected = [k for k in weights if k not in own]
    if wrong or unexpected:
        raise InitError(f"--init {init.path}: its weights do not fit this run's model: "
                        f"{'; '.join((wrong + unexpected)[:3])}")
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in fresh]
    if missing:
        raise InitError(f"--init {init.path}: incomplete weights, {len(missing)} missing (e.g. "
                        f"{', '.join(missing[:3])})")
    part = "encoder and decoder" if init.decoder else "encoder"
    return [f"init: {part} from {init.path} ({init.source_format} weights); optimizer, schedule and epochs start "
            f"afresh", *notes]
