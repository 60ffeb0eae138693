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
(fcmae.weights.hf). An OUT ending in .safetensors is written in that format.
Inputs are read by fcmae.weights.io: safetensors, or
torch.load(weights_only=True), so a file that would run code is refused.
The FCMAE decoder (proj, mask_token, decoder, pred) is dropped and
reported: fine-tuning does not use it.

The name and layout mappings live in fcmae.weights.layouts, format detection,
checks, verification and file output in fcmae.weights.conversion; this module
is the command, and its names below stay importable from here.
"""

import argparse
from pathlib import Path

from fcmae.runtime.command import run_cli
from fcmae.runtime.errors import DiskFullError
from fcmae.runtime.files import remove_stale_temporaries
from fcmae.weights.conversion import FORMATS, OUTPUT_FORMATS, describe_arch, load_weights, verify, write_output
from fcmae.weights.layouts import ConversionError
from sparse.sizes import check_size

# --verify runs by default below this many encoder parameters (atto .. base: < 90M).
VERIFY_BY_DEFAULT_MAX_PARAMS = 100_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fcmae-convert",
        description="Convert an FCMAE / sparse ConvNeXt V2 checkpoint into dense ConvNeXt V2 weights.",
        epilog="Input formats (detected): " + ", ".join(FORMATS) + ". See finetune.convert.")
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

    args = parse_args(argv)
    run_cli("fcmae-convert", lambda: run(args), (ConversionError, DiskFullError))


if __name__ == "__main__":
    main()
