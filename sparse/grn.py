"""Global Response Normalization over the visible sites of each image, with a hand-written backward.

ConvNeXt V2's GRN, per image n and channel c, over the sites s of the image:

    gx[n, c] = sqrt(sum_s x[n, s, c]^2)          (masked sites are zero: they add nothing)
    nx[n, c] = gx[n, c] / (mean_c gx[n, c] + eps)
    y = x + bias + weight * x * nx = x * (1 + weight * nx) + bias

Written with autograd's ops, a GRN over the MLP's 4C-wide hidden features
costs a dozen passes over that tensor, forward and backward; it was the
largest element-wise cost of a pre-training step on CPU. The backward below
needs two reductions (sum_s g * x, over a product copy, and sum_s g) and two
element-wise passes, the forward one reduction (over a squared copy) and one
pass, and it saves
x and (N, C) statistics for backward.

The gradient, with d = mean_c gx + eps and P[n, c] = sum_s g * x:

    d bias   = sum_{n,s} g
    d weight = sum_n P * nx
    d nx     = weight * P
    d gx     = d nx / d - sum_c(d nx * gx) / (C * d^2)
    d x      = g * (1 + weight * nx) + x * d gx / gx      (0 where gx = 0)

The norm is taken in float32 whatever the input dtype (as autocast does for
norms). This backward has run on CPU only so far; on a GPU, tests/runtime/test_cuda.py
runs it inside the FCMAE step. tests/sparse/test_grn.py checks values and gradients against timm's
GlobalResponseNorm, which is written with autograd's ops.
"""

from __future__ import annotations

import torch
from timm.layers.grn import GlobalResponseNorm as TimmGlobalResponseNorm


class _GlobalResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, S, C)
        norm = rows.float().square().sum(1).sqrt()  # (N, C)
        denom = norm.mean(-1, keepdim=True) + eps  # (N, 1)
        normalized = norm / denom
        out = torch.addcmul(bias, rows, (1 + weight * normalized).unsqueeze(1))
        ctx.save_for_backward(x, weight, norm, denom, normalized)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, norm, denom, normalized = ctx.saved_tensors
        channels = x.shape[-1]
        rows = x.reshape(x.shape[0], -1, channels)
        grad_rows = grad_out.reshape(rows.shape)
        grad_x = grad_weight = grad_bias = None
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if need_bias:
            grad_bias = grad_rows.sum((0, 1)).to(weight.dtype)
        if need_x or need_weight:
            products = (grad_rows * rows).sum(1)  # (N, C): sum over sites of g * x
            if need_weight:
                grad_weight = (products * normalized).sum(0).to(weight.dtype)
            if need_x:
                grad_normalized = weight * products
                grad_norm = grad_normalized / denom - (grad_normalized * norm).sum(-1, keepdim=True) / (
                    channels * denom * denom)
                # d norm / d x = x / norm; a zero norm means x is zero there, so the term is zero.
                per_x = torch.where(norm > 0, grad_norm / norm, torch.zeros_like(norm))
                grad_x = torch.mul(grad_rows, (1 + weight * normalized).unsqueeze(1))
                grad_x.addcmul_(rows, per_x.unsqueeze(1))  # in place: one tensor of x's size, not two
                grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


def global_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRN of x laid out (image, site axes..., channel), masked sites zero; see the module docstring.

    Args:
        x: (N, ..., C) features; every axis between the first and the last is a site axis.
        weight: (C,) gamma.
        bias: (C,) beta.
        eps: added to the mean norm of each image.
    """
    return _GlobalResponseNorm.apply(x, weight, bias, eps)



class GlobalResponseNorm(TimmGlobalResponseNorm):
    """timm's GRN layer (same parameters and names), computed by `global_response_norm` when channels-last.

    For dense models built from timm's blocks (the FCMAE decoder): swap it in
    for the block's `mlp.grn`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != -1:
            return super().forward(x)
        return global_response_norm(x, self.weight, self.bias, self.eps)
