"""Sparse ConvNeXt V2: the encoder that computes on visible sites only."""

from sparse.encoder import BACKENDS, SparseConvNeXtV2, build_encoder
from sparse.sizes import MODEL_SIZES, check_size

__all__ = ["BACKENDS", "MODEL_SIZES", "SparseConvNeXtV2", "build_encoder", "check_size"]
