"""Figures of the paper: t-SNE of pixel features (Fig. 8) and prototype activation maps (Fig. 7).

Both return an RGB uint8 image (H, W, 3) rendered off-screen (matplotlib Agg canvas), ready for a
logger or ``PIL.Image.fromarray``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

_MARKERS = "o^sDvP*Xh<>p"


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _new_figure(width_inches: float, height_inches: float, dpi: int) -> Figure:
    """A figure on its own Agg canvas: off-screen, no pyplot global state to leak."""
    fig = Figure(figsize=(width_inches, height_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def tsne_figure(
    features: torch.Tensor | np.ndarray,
    classes: torch.Tensor | np.ndarray,
    prototypes_assign: torch.Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    perplexity: float = 30.0,
    seed: int = 0,
    size_inches: float = 6.0,
    dpi: int = 100,
) -> np.ndarray:
    """2-D t-SNE of pixel features, coloured by class and marked by prototype (Fig. 8).

    Args:
        features: (N, D) pixel features (subsample to a few thousand beforehand).
        classes: (N,) class index of each feature.
        prototypes_assign: (N,) prototype index within the class (marker shape), or None.
        class_names: names indexed by class, for the legend; None uses the indices.
        perplexity: t-SNE perplexity (clipped below N).
        seed: t-SNE random state.
        size_inches: figure side in inches.
        dpi: dots per inch; the image side is size_inches * dpi pixels.

    Returns:
        (size_inches * dpi, size_inches * dpi, 3) uint8 RGB image.
    """
    x = _to_numpy(features).astype(np.float32)
    cls = _to_numpy(classes).astype(int)
    perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))
    embedding = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed
    ).fit_transform(x)
    proto = None if prototypes_assign is None else _to_numpy(prototypes_assign).astype(int)

    fig = _new_figure(size_inches, size_inches, dpi)
    ax = fig.add_subplot(1, 1, 1)
    shown = np.unique(cls)
    # tab10's colours are the most distinct; tab20 only when more classes are in view.
    colours = matplotlib.colormaps["tab10" if len(shown) <= 10 else "tab20"]
    for i, c in enumerate(shown):
        name = class_names[c] if class_names is not None else str(c)
        colour = colours(i % colours.N)
        in_class = cls == c
        if proto is None:
            ax.scatter(*embedding[in_class].T, s=4, color=colour, label=name)
            continue
        for k in np.unique(proto[in_class]):
            sel = in_class & (proto == k)
            marker = _MARKERS[k % len(_MARKERS)]
            label = name if k == proto[in_class].min() else None
            ax.scatter(*embedding[sel].T, s=6, color=colour, marker=marker, label=label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=6, markerscale=2)
    fig.tight_layout()
    return _figure_to_rgb(fig)


def prototype_activation_maps(
    image: torch.Tensor | np.ndarray,
    similarity: torch.Tensor | np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str] | None = None,
    panel_inches: float = 2.0,
    dpi: int = 100,
) -> np.ndarray:
    """Grid of pixel-to-prototype similarity maps (Fig. 7): one row per class.

    Column 0 is the image; column k + 1 is prototype k's similarity (normalised per map to
    [0, 1]) overlaid on the image. Panels keep the image's aspect ratio; a strip on top
    holds the prototype titles.

    Args:
        image: (3, H, W) RGB image, float in [0, 1] or uint8.
        similarity: (C, K, h, w) similarity maps (e.g. PrototypeLearning.prototype_similarity
            for one image); upsampled to H x W for display.
        classes: class indices to show, one row each.
        class_names: names indexed by class; None uses the indices.
        panel_inches: side of one panel in inches.
        dpi: dots per inch.

    Returns:
        (round((len(classes) * panel_inches * H / W + 0.25) * dpi), (K + 1) * panel_inches
        * dpi, 3) uint8 RGB.
    """
    img = _to_numpy(image).astype(np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    img = np.clip(img.transpose(1, 2, 0), 0.0, 1.0)
    sim = torch.as_tensor(_to_numpy(similarity), dtype=torch.float32)
    height, width = img.shape[:2]
    sim = torch.nn.functional.interpolate(sim, size=(height, width), mode="bilinear")
    sim = sim.numpy()
    K = sim.shape[1]
    rows, cols = len(classes), K + 1
    panel_height = panel_inches * height / width  # panels keep the image's aspect ratio
    title_inches = 0.25

    fig = _new_figure(cols * panel_inches, rows * panel_height + title_inches, dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, c in enumerate(classes):
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(class_names[c] if class_names is not None else str(c), fontsize=7)
        for k in range(K):
            heat = sim[c, k]
            heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
            axes[r, k + 1].imshow(img)
            axes[r, k + 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if r == 0:
                axes[r, k + 1].set_title(f"prototype {k}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    top = 1 - title_inches / (rows * panel_height + title_inches)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=top, wspace=0.02, hspace=0.02)
    return _figure_to_rgb(fig)
