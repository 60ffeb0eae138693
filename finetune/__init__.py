"""Sparse -> dense conversion, fine-tuning and evaluation of ConvNeXt V2."""
