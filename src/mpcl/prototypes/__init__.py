"""Multiple-prototype contrastive learning (MPCL, paper Section III-B).

Knows nothing of Lightning or of the UDA method: it takes projected features, labels and
per-pixel weights, and returns losses and diagnostics.

Modules: ``module`` (``PrototypeLearning``, the step), ``kinds`` (the prototypes and their
similarities), ``clustering`` (Sinkhorn, K-Means), ``losses``, ``updates`` (the feature bank
modes and the K-Means start), ``feature_bank`` and ``diagnostics``.
"""

from mpcl.prototypes.clustering import cluster_statistics, kmeans, sinkhorn
from mpcl.prototypes.feature_bank import FeatureBank
from mpcl.prototypes.kinds import CentroidPrototypes, GaussianPrototypes, Prototypes
from mpcl.prototypes.losses import class_scores, consistency_loss, contrastive_loss
from mpcl.prototypes.module import PrototypeLearning, downsample

__all__ = [
    "CentroidPrototypes",
    "FeatureBank",
    "GaussianPrototypes",
    "PrototypeLearning",
    "Prototypes",
    "class_scores",
    "cluster_statistics",
    "consistency_loss",
    "contrastive_loss",
    "downsample",
    "kmeans",
    "sinkhorn",
]
