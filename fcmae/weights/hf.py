"""Export to Hugging Face `transformers`: a folder that `ConvNextV2Model.from_pretrained` loads.

    fcmae-convert IN OUT --format hf      ->  OUT/config.json, OUT/model.safetensors

    from transformers import ConvNextV2Model
    model = ConvNextV2Model.from_pretrained(OUT)

Its `hidden_states[1:]` are timm's four stage outputs and
`last_hidden_state` is timm's `forward_features` (tests/weights/test_eval_export.py).
The folder holds the backbone: a classifier head (`head.fc`) is left out
and reported. ConvNextV2Model ends in a LayerNorm of the pooled features
(timm's `head.norm`); when the weights have none (FCMAE encoders), it is
written as the identity affine (weight 1, bias 0), which is how a fresh
timm head starts. `transformers` is needed only to load the folder, not
to write it (`pip install fcmae[hf]`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from fcmae.runtime.files import temporary_folder
from fcmae.weights.io import write_weights
from fcmae.weights.layouts import ConversionError

__all__ = ["hf_config", "to_hf", "save_hf"]

StateDict = Dict[str, torch.Tensor]
LAYER_NORM_EPS = 1e-6  # timm's ConvNeXt V2 LayerNorms (transformers' default for the final norm is 1e-12)


def hf_config(depths, dims, in_chans: int = 3) -> Dict[str, Any]:
    """`ConvNextV2Config` fields for these depths, dims and image channels."""
    return {
        "architectures": ["ConvNextV2Model"],
        "model_type": "convnextv2",
        "num_channels": int(in_chans),
        "patch_size": 4,
        "num_stages": 4,
        "depths": [int(d) for d in depths],
        "hidden_sizes": [int(d) for d in dims],
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "drop_path_rate": 0.0,
        "image_size": 224,
    }


def to_hf(timm_state: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """timm-named ConvNeXt V2 weights -> ConvNextV2Model's names and shapes; returns (weights, dropped)."""
    out, dropped = {}, {}
    for key, value in timm_state.items():
        k = key
        if k.startswith("head.fc."):
            dropped[k] = "the classifier head: ConvNextV2Model is the backbone"
            continue
        k = re.sub(r"^head\.norm\.", "layernorm.", k)
        k = re.sub(r"^stem\.0\.", "embeddings.patch_embeddings.", k)
        k = re.sub(r"^stem\.1\.", "embeddings.layernorm.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".norm.", ".layernorm.")
        k = k.replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.").replace(".mlp.grn.", ".grn.")
        if re.search(r"\.pwconv[12]\.weight$", k):
            value = value.reshape(value.shape[0], -1)  # 1x1 conv (atto .. nano in timm) or Linear -> Linear
        elif ".grn." in k:
            value = value.reshape(1, 1, 1, -1)
        out[k] = value
    if "layernorm.weight" not in out:
        width = out["encoder.stages.3.layers.0.dwconv.weight"].shape[0]
        out["layernorm.weight"], out["layernorm.bias"] = torch.ones(width), torch.zeros(width)
    return out, dropped


def save_hf(conversion, output) -> Path:
    """Write `conversion` (a finetune.convert.Conversion) as a Hugging Face folder; replaces OUT whole.

    The folder is built next to OUT (fcmae.runtime.files.temporary_folder)
    and renamed into place, so an existing OUT is never left half-written.
    """

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder; --format hf writes a folder")
    weights, dropped = to_hf(conversion.state_dict)
    conversion.dropped.update(dropped)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(output)  # the umask's permissions; removed by the converter if this process is killed
    try:
        write_weights(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf_config(conversion.depths, conversion.dims, conversion.in_chans)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if output.is_dir():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
