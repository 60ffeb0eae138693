"""FCMAE pre-training of ConvNeXt V2 with the sparse encoder of `sparse`."""

from fcmae.masking import patchify, random_mask, unpatchify
from fcmae.model import FCMAE, build_fcmae

__all__ = ["FCMAE", "build_fcmae", "patchify", "random_mask", "unpatchify"]
