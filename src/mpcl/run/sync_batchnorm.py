"""Union-batch BatchNorm for CPU ranks (``trainer=ddp_sim``), where torch's SyncBatchNorm
refuses to run: a Lightning ``LayerSync`` plugin that swaps the class of every BatchNorm layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the union batch over all ranks.

    torch's ``SyncBatchNorm`` only runs on GPUs; this is the same computation with
    ``torch.distributed.nn`` all-reduces (differentiable, any backend), for CPU ranks
    (``trainer=ddp_sim``). Two passes, as ``F.batch_norm``: the mean, then the variance
    around it, so the result matches one process on the union batch to float rounding.

    Not constructed directly: :class:`SyncBatchNormAnyDevice` swaps the class of existing
    BatchNorm layers in place (parameters and buffers stay the same tensors).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) -> (B, C, ...)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = x.new_tensor(float(x.numel() // x.shape[1]))
        sums = all_reduce(torch.cat([x.sum(dims), count[None]]))
        total = sums[-1]
        mean = sums[:-1] / total
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # cumulative moving average
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2-D input, got {x.dim()}-D")


class SyncBatchNormAnyDevice(LayerSync):
    """Lightning ``LayerSync`` plugin: every BatchNorm layer normalises with union-batch
    statistics (:class:`GlobalBatchNorm`), on any device and process-group backend.

    ``trainer=ddp_sim`` uses it (``trainer.plugins``); on GPUs ``trainer.sync_batchnorm``
    (torch's fused SyncBatchNorm) does the same faster.
    """

    _ORIGINAL = "_mpcl_original_class"

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, GlobalBatchNorm
            ):
                setattr(module, self._ORIGINAL, type(module))
                module.__class__ = GlobalBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            original = module.__dict__.pop(self._ORIGINAL, None)
            if original is not None:
                module.__class__ = original
        return model
