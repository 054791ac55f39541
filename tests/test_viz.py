"""Figures: t-SNE (Fig. 8) and prototype activation maps (Fig. 7) render to RGB arrays."""

import numpy as np
import torch

from mpcl.monitor.viz import prototype_activation_maps, tsne_figure


def test_tsne_figure_shape():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(60, 16, generator=gen)
    classes = torch.randint(0, 3, (60,), generator=gen)
    assign = torch.randint(0, 2, (60,), generator=gen)
    image = tsne_figure(features, classes, assign, ["road", "car", "sky"], size_inches=2, dpi=50)
    assert image.shape == (100, 100, 3) and image.dtype == np.uint8
    assert tsne_figure(features, classes, None, None, size_inches=2, dpi=50).shape == (100, 100, 3)


def test_prototype_activation_maps_shape():
    image = torch.rand(3, 32, 64)
    similarity = torch.randn(4, 3, 8, 16)  # C=4, K=3
    grid = prototype_activation_maps(image, similarity, [0, 2], panel_inches=1, dpi=40)
    assert grid.shape == ((2 * 0.5 + 0.25) * 40, 4 * 40, 3) and grid.dtype == np.uint8
