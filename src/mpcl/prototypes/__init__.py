"""Multiple-prototype contrastive learning (MPCL, paper Section III-B).

Knows nothing of Lightning or of the UDA method: it takes projected features, labels at
feature resolution and per-pixel weights, and returns losses and diagnostics.
"""

from mpcl.prototypes.banks import (
    PROTOTYPE_TYPES,
    CentroidPrototypes,
    GaussianPrototypes,
    PrototypeBank,
    make_prototypes,
)
from mpcl.prototypes.clustering import cluster_statistics, kmeans, sinkhorn
from mpcl.prototypes.feature_bank import FeatureBank
from mpcl.prototypes.losses import class_scores, consistency_loss, contrastive_loss
from mpcl.prototypes.module import PrototypeLearning, downsample_labels, downsample_weights

__all__ = [
    "PROTOTYPE_TYPES",
    "CentroidPrototypes",
    "FeatureBank",
    "GaussianPrototypes",
    "PrototypeBank",
    "PrototypeLearning",
    "class_scores",
    "cluster_statistics",
    "consistency_loss",
    "contrastive_loss",
    "downsample_labels",
    "downsample_weights",
    "kmeans",
    "make_prototypes",
    "sinkhorn",
]
