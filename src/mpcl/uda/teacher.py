"""The EMA teacher (Eq. 2): phi_t <- alpha_t * phi_{t-1} + (1 - alpha_t) * theta_t.

As in DAFormer/HRDA/MIC, alpha_t = min(1 - 1 / (t + 1), alpha): the teacher is a copy of the
student at t = 0 and then averages ever more slowly. Only parameters are averaged (not
buffers). The teacher runs with dropout and drop-path off but BatchNorm in training mode
(batch statistics), exactly like the published code, whose teacher is a sub-module of the
model in train mode with only its dropout layers switched to eval.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import DropPath
from torch import nn


def ema_alpha(step: int, max_alpha: float) -> float:
    """alpha_t = min(1 - 1 / (t + 1), max_alpha)."""
    return min(1.0 - 1.0 / (step + 1), max_alpha)


class EMATeacher(nn.Module):
    """A frozen copy of the student whose parameters follow the student by EMA.

    Args:
        student: the model to copy (any nn.Module).
        alpha: the EMA momentum ceiling (0.999 in the paper).
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"uda.ema_alpha={alpha} must be in [0, 1)")
        self.alpha = alpha
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Average the student's parameters into the teacher; returns the alpha used."""
        alpha = ema_alpha(step, self.alpha)
        teacher_params = [p for p in self.model.parameters()]
        student_params = [p.detach() for p in student.parameters()]
        # One fused multiply-add over all tensors instead of a Python loop of kernels.
        torch._foreach_mul_(teacher_params, alpha)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)
        return alpha

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        # Pseudo-labels must not be noised by dropout / stochastic depth.
        for m in self.model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd | DropPath):
                m.training = False
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)
