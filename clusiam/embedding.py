"""Maps of feature spaces: UMAP (McInnes et al. 2018, with umap-learn) of an encoder's test
features in two dimensions, coloured by label and, for a clustered checkpoint, by cluster,
with the randomly initialised encoder's map beside it for comparison.

The same seeded sample of at most :data:`MAX_POINTS` test patches is drawn for every encoder
of a report (:func:`clusiam.sources.seeded_sample`), so the panels show the same patches.
UMAP uses the cosine metric, the geometry the KNN search uses, and a fixed seed (which makes
it run on one thread).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

MAX_POINTS = 20_000
SEED = 0
MIN_POINTS = 8  # fewer points than this have no meaningful neighbourhood graph
NEIGHBOURS = 15  # umap-learn's default


@dataclass
class Panel:
    """One scatter plot: 2-D points coloured by a category per point."""

    title: str
    points: np.ndarray  # (N, 2)
    categories: Sequence  # a label or cluster per point
    legend: bool  # class labels get a legend; a hundred clusters do not


def embed(features: np.ndarray, seed: int = SEED) -> np.ndarray:
    """A 2-D UMAP of ``features`` (cosine metric); at least :data:`MIN_POINTS` rows."""
    import umap  # its import compiles numba code: only where a map is drawn

    neighbours = min(NEIGHBOURS, len(features) - 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden")  # a fixed seed runs on one thread
        reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, metric="cosine", random_state=seed, n_jobs=1)
        return reducer.fit_transform(np.asarray(features, dtype=np.float32))


def plot_panels(panels: Sequence[Panel], title: str, path: Path) -> None:
    """The panels side by side in one PNG."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        names = sorted(set(panel.categories), key=str)
        index = {name: i for i, name in enumerate(names)}
        colours = plt.get_cmap("tab10" if len(names) <= 10 else "gist_ncar")
        codes = np.array([index[c] for c in panel.categories])
        for name in names:
            rows = codes == index[name]
            colour = colours(index[name] if len(names) <= 10 else index[name] / max(len(names) - 1, 1))
            ax.scatter(panel.points[rows, 0], panel.points[rows, 1], s=4, color=colour, label=str(name),
                       alpha=0.7, linewidths=0)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if panel.legend:
            ax.legend(fontsize=7, markerscale=3, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
