"""Figures of an evaluation (PNG, drawn by matplotlib's Agg canvas without pyplot, so a
notebook's backend is left alone): training history, model vs data ATE scatter with each
intervention's top DE genes marked, and perturbation x latent heatmaps of mask
probabilities and embeddings (perturbations ordered by similarity)."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd


def _figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` drawn by matplotlib's Agg canvas directly, without pyplot: the
    caller's backend (a notebook's, say) stays as it is, and no figure is left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    squeeze = kwargs.pop("squeeze", True)
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def similarity_order(values: np.ndarray) -> np.ndarray:
    """Row order that puts similar rows together (average-linkage leaves)."""
    if values.shape[0] < 3:
        return np.arange(values.shape[0])
    from scipy.cluster.hierarchy import leaves_list, linkage

    return leaves_list(linkage(np.nan_to_num(values), method="average", metric="euclidean"))


def heatmap_rows(frame: pd.DataFrame, max_rows: int = 200, measure: str = "values") -> tuple[pd.Index, str]:
    """The rows of ``frame`` (perturbations x dims) a heatmap shows, in similarity order:
    all, or the ``max_rows`` of largest summed absolute value; with a note for the title
    where rows were left out (``measure`` names the values there), else ``""``."""
    values = frame.to_numpy()
    keep = np.arange(values.shape[0])
    note = ""
    if values.shape[0] > max_rows:  # keep the most active perturbations
        note = f"the {max_rows} of {values.shape[0]} perturbations with the largest sum of |{measure}|"
        keep = np.sort(np.argsort(-np.abs(values).sum(1))[:max_rows])
    return frame.index[keep[similarity_order(values[keep])]], note


def plot_history(history: pd.DataFrame, path: str, objective: str = "elbo", true_mask_density: float | None = None):
    """Training and validation loss per step (``objective``: the run's ``objective.kind``,
    which names the loss on the axis), and beside it, where ``history`` has them (simulations
    of models with a mask), the learned mask's density and F1 against the truth, with the
    true mask's density (``true_mask_density``) as a dashed line. Few rows (20 or fewer)
    get markers. Returns the figure's axes."""
    mask_columns = [c for c in ("mask_density", "mask_f1") if c in history and history[c].notna().any()]
    marker = "o" if len(history) <= 20 else None
    fig, axes = _figure(1, 2 if mask_columns else 1, figsize=(11 if mask_columns else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(history["step"], history["train_loss"], label="train (window mean)", marker=marker)
    ax.plot(history["step"], history["val_loss"], label="validation", marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (minus {'IWELBO' if objective == 'iwelbo' else 'ELBO'} per cell)")
    ax.legend()
    ax.set_title("Training history")
    if mask_columns:
        masks = axes[0, 1]
        for column in mask_columns:
            masks.plot(history["step"], history[column], label=column.replace("_", " "), marker=marker)
        if true_mask_density is not None:
            masks.axhline(true_mask_density, color="0.3", ls="--", lw=0.8,
                          label=f"true mask density ({true_mask_density:.3f})")
        masks.set_xlabel("step")
        masks.set_ylim(0, 1)
        masks.legend()
        masks.set_title("Learned mask (q > 0.5) against the true mask")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return axes[0]


def plot_ate_scatter(data_ate: np.ndarray, model_ate: np.ndarray, top: np.ndarray, path: str,
                     title: str = "ATE: model vs data", top_label: str = "top DE genes") -> None:
    """data_ate, model_ate ``[I, G]``; top ``[I, G]`` bool (top DE genes per intervention,
    ``top_label`` in the legend)."""
    fig, ax = _figure(figsize=(5, 5))
    keep = np.isfinite(data_ate) & np.isfinite(model_ate)
    ax.scatter(data_ate[keep & ~top], model_ate[keep & ~top], s=3, alpha=0.3, color="0.6", label="other genes")
    ax.scatter(data_ate[keep & top], model_ate[keep & top], s=5, alpha=0.6, color="C3", label=top_label)
    lo = float(np.nanmin([data_ate[keep].min(), model_ate[keep].min()])) if keep.any() else -1.0
    hi = float(np.nanmax([data_ate[keep].max(), model_ate[keep].max()])) if keep.any() else 1.0
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="model = data")
    ax.set_xlabel("data ATE")
    ax.set_ylabel("model ATE")
    ax.set_title(textwrap.fill(title, width=50), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_heatmap(frame: pd.DataFrame, path: str, title: str, cmap: str = "viridis", center: bool = False,
                 max_rows: int = 200, value_range: tuple[float, float] | None = None,
                 xlabel: str = "latent dimension", marked: pd.DataFrame | None = None,
                 value_label: str = "", rows: tuple[pd.Index, str] | None = None) -> None:
    """Perturbations (rows) x latent dims; entries where ``marked`` (same shape, booleans)
    is true get a dot. ``rows``: the rows to show, in order, with a note for the title
    (:func:`heatmap_rows`, e.g. one order for several heatmaps); default: ordered by
    similarity, at most ``max_rows`` (those of largest summed absolute value, as the title
    then says). The title wraps to the figure's width; ``value_label`` names the colour
    bar."""
    index, note = rows if rows is not None else heatmap_rows(frame, max_rows)
    if note:
        title = f"{title}; {note}"
    positions = frame.index.get_indexer(index)
    if (positions < 0).any():
        raise ValueError(f"rows {list(np.asarray(index)[positions < 0][:5])} are not in the frame's index")
    values = frame.to_numpy()[positions]
    dots = (np.zeros(frame.shape, bool) if marked is None else marked.to_numpy(bool))[positions]
    index = np.asarray(index)
    # a quarter inch per latent dimension up to 16 inches (K = 100: narrower columns, not a
    # 27-inch strip), at least 3.5 inches tall for a few perturbations
    height = min(max(2 + 0.12 * values.shape[0], 3.5), 30)
    width = min(max(2 + 0.25 * values.shape[1], 5.0), 16.0)
    fig, ax = _figure(figsize=(width, height))
    if value_range is None and center and values.size:
        limit = float(np.abs(values).max())
        value_range = (-limit, limit)
    low, high = value_range or (None, None)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, vmin=low, vmax=high)
    if dots.any():
        rows, columns = np.nonzero(dots)
        ax.scatter(columns, rows, s=4, c="black", marker="o", linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perturbation")
    ax.set_yticks(range(values.shape[0]), index, fontsize=6 if values.shape[0] <= 100 else 5)
    ax.set_title(textwrap.fill(title, width=int(width * 8)), fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.6, label=value_label or None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pathway_similarity(frame: pd.DataFrame, labels: np.ndarray, path: str, title: str) -> None:
    """Cosine similarity of the perturbations' vectors (``frame``: perturbations x latent
    dims) among the perturbations of a pathway (``labels`` ``[P]``, ``""``: none;
    :func:`sams_jax.metrics.pathway_labels`), grouped by pathway (each pathway's block
    framed and named): blocks brighter than their surroundings mean the model groups a
    pathway's perturbations."""
    from matplotlib.patches import Rectangle

    from sams_jax.metrics import cosine_similarity

    labels = np.asarray(labels, dtype=object)
    order = [i for name in sorted(set(labels) - {""}) for i in np.flatnonzero(labels == name)]
    values = frame.to_numpy(np.float64)[order]
    cosine, names = cosine_similarity(values, values), labels[order]
    size = min(4 + 0.03 * len(order), 14)
    fig, ax = _figure(figsize=(size + 1.5, size))
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    starts = [0] + [i for i in range(1, len(names)) if names[i] != names[i - 1]] + [len(names)]
    for start, stop in zip(starts[:-1], starts[1:]):
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False, lw=0.8))
    centres = [(start + stop - 1) / 2 for start, stop in zip(starts[:-1], starts[1:])]
    ax.set_yticks(centres, [names[start] for start in starts[:-1]], fontsize=7)
    ax.set_xticks([])
    ax.set_title(textwrap.fill(title, width=int(size * 9)), fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.6, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

