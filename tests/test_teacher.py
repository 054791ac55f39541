"""EMA teacher (Eq. 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpcl.uda.teacher import EMATeacher, ema_alpha


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))


def test_ema_alpha_schedule():
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(10_000, 0.999) == 0.999


def test_ema_update_matches_direct_computation():
    torch.manual_seed(0)
    student = _net()
    teacher = EMATeacher(student, alpha=0.999)
    before = [p.detach().clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    step = 4
    alpha = teacher.update(student, step)
    assert alpha == pytest.approx(1 - 1 / 5)
    for t, b, s in zip(teacher.model.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, alpha * b + (1 - alpha) * s.detach())
    # Step 0 copies the student exactly.
    teacher.update(student, 0)
    for t, s in zip(teacher.model.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s.detach())


def test_ema_teacher_buffers_not_averaged_and_no_grad():
    student = _net()
    teacher = EMATeacher(student)
    with torch.no_grad():
        student[1].running_mean.fill_(5.0)
    teacher.update(student, 10)
    assert torch.all(teacher.model[1].running_mean == 0.0)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_dropout_off_but_batchnorm_in_train_mode():
    teacher = EMATeacher(_net()).train()
    assert not teacher.model[2].training  # dropout
    assert teacher.model[1].training  # BatchNorm uses batch statistics, as DAFormer's teacher
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(teacher(x), teacher(x))  # deterministic: no dropout
