"""Weight init shared by the dense archs' hand-stacked weights."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_linear_(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    """N(0, scale^2 / fan_in): a linear map keeps unit-variance inputs at unit variance (times `scale`)."""
    nn.init.normal_(weight, mean=0.0, std=scale / math.sqrt(fan_in))
