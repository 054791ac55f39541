"""MPCL losses, one per module: pixel-to-prototype contrast and prototype consistency."""

from mpcl.prototypes.losses.consistency import class_scores, consistency_loss
from mpcl.prototypes.losses.contrastive import contrastive_loss

__all__ = ["class_scores", "consistency_loss", "contrastive_loss"]
