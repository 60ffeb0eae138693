"""The registry of ConvNeXt V2 sizes: depths and widths of the four stages."""

from typing import Dict, Sequence, Tuple

# name -> (depths, dims), as in the ConvNeXt V2 paper and timm's convnextv2_<name>.
MODEL_SIZES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

# timm builds these sizes with 1x1 convolutions and channels-first norms in the
# blocks (fc weights of shape (4C, C, 1, 1)); the others use Linear layers.
TIMM_CONV_MLP_SIZES = ("atto", "femto", "pico", "nano")


def check_size(size: str) -> str:
    """Return `size` (lower-cased, 'convnextv2_' prefix allowed) or raise a clear error."""
    name = str(size).lower()
    if name.startswith("convnextv2_"):
        name = name[len("convnextv2_"):]
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown ConvNeXt V2 size {size!r}; choose one of: {', '.join(MODEL_SIZES)}")
    return name


def resolve_arch(size: str, depths: Sequence[int] = None, dims: Sequence[int] = None):
    """Depths and dims of `size`, each optionally overridden; validated."""
    default_depths, default_dims = MODEL_SIZES[check_size(size)]
    depths = tuple(int(d) for d in (default_depths if depths is None else depths))
    dims = tuple(int(d) for d in (default_dims if dims is None else dims))
    if len(depths) != 4 or len(dims) != 4:
        raise ValueError(f"ConvNeXt V2 has 4 stages: got depths={depths}, dims={dims}")
    if min(depths) < 1 or min(dims) < 1:
        raise ValueError(f"depths and dims must be positive: got depths={depths}, dims={dims}")
    return depths, dims


def size_of(depths: Sequence[int], dims: Sequence[int]):
    """The registered size name with exactly these depths and dims, or None."""
    for name, (d, c) in MODEL_SIZES.items():
        if tuple(depths) == d and tuple(dims) == c:
            return name
    return None
