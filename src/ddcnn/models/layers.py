"""Grouped building blocks: one module computes ``groups`` independent copies of a layer at once.

A backbone built with ``groups=N`` holds the N local CNNs of a decomposition in one module: channel tensors are
laid out group-major, ``(B, N*C, *spatial)``, so group ``g`` owns channels ``[g*C, (g+1)*C)``. Convolutions are
grouped convolutions (one kernel launch for all subdomains), batch norm keeps separate statistics per channel and
hence per subdomain, and dense layers are batched matrix products. With ``groups=1`` these are the ordinary layers
of a single CNN, and every parameter of the grouped module is the concatenation (along dim 0) of the N single
modules' parameters, which is what :func:`split_state_dict` and :func:`stack_state_dicts` rely on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def conv(dims: int, cin: int, cout: int, kernel: int, groups: int, stride: int = 1, bias: bool = False) -> nn.Module:
    """``groups`` independent ``cin -> cout`` convolutions with 'same'-style padding."""
    return _CONV[dims](groups * cin, groups * cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)


def batchnorm(dims: int, channels: int, groups: int) -> nn.Module:
    return _BATCHNORM[dims](groups * channels)


def maxpool(dims: int, kernel: int = 2, stride: int | None = None, padding: int = 0) -> nn.Module:
    return _MAXPOOL[dims](kernel, stride=stride, padding=padding)


def adaptive_avgpool(dims: int, size: int | tuple[int, ...]) -> nn.Module:
    return _AVGPOOL[dims](size)


class GroupedLinear(nn.Module):
    """``groups`` independent dense layers: ``(B, G, in) -> (B, G, out)``; weight ``(G, out, in)``."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the same initialisation as nn.Linear, for each group
        bound = 1 / math.sqrt(self.in_features)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        out = torch.einsum("bgi,goi->bgo", x, self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


def grouped_flatten(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, G*C, *spatial)`` -> ``(B, G, C*prod(spatial))``: each group's features in a single model's order."""
    return x.reshape(x.shape[0], groups, -1)


def split_state_dict(state: dict[str, torch.Tensor], groups: int, index: int) -> dict[str, torch.Tensor]:
    """The state dict of group ``index`` of a grouped module, as a ``groups=1`` module expects it."""
    return {k: (v.chunk(groups)[index].clone() if v.dim() > 0 else v.clone()) for k, v in state.items()}


def stack_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state_dict`: N ``groups=1`` state dicts -> one ``groups=N`` state dict."""
    return {k: (torch.cat([s[k] for s in states]) if v.dim() > 0 else v.clone()) for k, v in states[0].items()}
