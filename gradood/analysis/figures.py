"""The analysis figures as ``matplotlib.figure.Figure`` objects (no pyplot state)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gradood.data.demo import DEMO_ID_SOURCE

ID_COLOUR = "black"
#: how the report names the x the Fisher estimate averages over
SOURCE_LABEL = {"samples": "model samples", "data": "held-out in-distribution rows"}


def short(name: str, width: int = 34) -> str:
    """A parameter name that fits a subplot title: its tail, with an ellipsis when cut."""
    return name if len(name) <= width else "\u2026" + name[-(width - 1) :]


def _colours(sources: list[str]) -> dict[str, Any]:
    cycle = iter(f"C{i}" for i in range(10))
    return {s: ID_COLOUR if s == DEMO_ID_SOURCE else next(cycle) for s in sources}


def _grid(n: int, cols: int = 3, size: float = 3.4) -> tuple[Figure, list[Any]]:
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(size * cols, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def histogram_figure(entry: dict[str, Any], shown: dict[str, list[str]], group_size: int) -> Figure:
    """Fig. 4: density histograms of log f_j per source for the shown layers."""
    names = [*shown["separating"], *shown["random"]]
    fig, axes = _grid(len(names))
    colours = _colours(list(entry["logs"]))
    for ax, name in zip(axes, names, strict=True):
        h = entry["histograms"][name]
        for source, density in h["density"].items():
            lw = 2.0 if source == DEMO_ID_SOURCE else 1.2
            ax.stairs(density, h["edges"], color=colours[source], lw=lw, label=source)
        tag = "separating" if name in shown["separating"] else "random"
        ax.set_title(f"{short(name)}\n({tag})", fontsize=8)
        ax.set_xlabel(r"$\log f_j$", fontsize=8)
        ax.tick_params(labelsize=7)
    if axes:
        axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"log f_j per source, B={group_size} (ID: held-out FashionMNIST, black)", fontsize=10)
    return fig


def scatter_figure(
    entry: dict[str, Any], layer_a: int, layer_b: int, names: list[str], group_size: int
) -> Figure:
    """log f of two layers against each other, one colour per source."""
    fig = Figure(figsize=(5.6, 4.6), layout="constrained")
    ax = fig.subplots()
    colours = _colours(list(entry["logs"]))
    for source, logs in entry["logs"].items():
        ax.scatter(logs[:, layer_a], logs[:, layer_b], s=5, alpha=0.5, color=colours[source], label=source)
    ax.set_xlabel(f"log f: {short(names[layer_a], 48)}", fontsize=8)
    ax.set_ylabel(f"log f: {short(names[layer_b], 48)}", fontsize=8)
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title(f"two layers, B={group_size}", fontsize=10)
    return fig


def fisher_figure(fisher: dict[str, Any]) -> Figure:
    """Fig. 5: normalised FIM slices |F_ik| / sqrt(F_ii F_kk) per layer and pooled over the layers."""
    panels = [(short(n, 30), e["normalised"], e.get("dominance")) for n, e in fisher["layers"].items()]
    panels.append(
        ("pooled (layers in blocks)", fisher["pooled"]["normalised"], fisher["pooled"]["dominance"])
    )
    fig, axes = _grid(len(panels), cols=min(3, len(panels)), size=3.6)
    image = None
    for ax, (title, slice_, ratio) in zip(axes, panels, strict=True):
        image = ax.imshow(slice_, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        extra = "" if ratio is None else f"\ndiag/off-diag {ratio:.1f}x"
        ax.set_title(title + extra, fontsize=8)
        ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.7, label="|F_ik| / sqrt(F_ii F_kk)")
    fig.suptitle(f"FIM slices over {fisher['n']} {SOURCE_LABEL[fisher['source']]}", fontsize=10)
    return fig


def correlation_figure(corr: dict[str, Any]) -> Figure:
    """Fig. 6: correlation matrix of log f_j (parameter order) and mean |rho| against layer distance."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    image = left.imshow(corr["corr"], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=left, shrink=0.8, label="Pearson correlation of log f")
    left.set_title("layers in parameter order (fit set, B=1)", fontsize=9)
    right.plot(corr["distance"], corr["mean_abs_corr"], "o", ms=4, mfc="none", label="mean |rho|")
    right.plot(corr["distance"], corr["mean_corr"], "x", ms=3, label="mean rho")
    right.axhline(0, color="grey", lw=0.6)
    right.set_xlabel("index distance |i - k| in the parameter order")
    right.set_ylabel("correlation")
    right.set_title(
        f"Spearman(d, |rho|) = {corr['spearman']:.2f}, permutation p = {corr['p_value']:.3g}", fontsize=9
    )
    right.legend(fontsize=8)
    return fig


def qq_figure(
    fit_logs: np.ndarray, columns: list[int], names: list[str], normality: dict[str, Any]
) -> Figure:
    """QQ plots of standardised log f_j on the fit set for the shown layers, K^2 p-value in the title."""
    from scipy import stats

    fig, axes = _grid(len(columns))
    for ax, j in zip(axes, columns, strict=True):
        (theoretical, sample), _ = stats.probplot(fit_logs[:, j])
        z = (sample - sample.mean()) / sample.std(ddof=1)
        ax.plot(theoretical, z, ".", ms=2)
        lim = [theoretical.min(), theoretical.max()]
        ax.plot(lim, lim, color="grey", lw=0.8)
        ax.set_title(f"{short(names[j])}\nK^2 p = {normality['normaltest_p'][j]:.2g}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("QQ plots of standardised log f_j against N(0, 1) (fit set, B=1)", fontsize=10)
    return fig


def normality_figure(normality: dict[str, Any], chi2: dict[str, np.ndarray]) -> Figure:
    """Per layer: normality p-values against the level, and the KS distance of the two fitted laws."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    idx = np.arange(len(normality["normaltest_p"]))
    floor = 1e-300
    left.semilogy(idx, np.maximum(normality["normaltest_p"], floor), ".", label="D'Agostino K^2")
    left.semilogy(idx, np.maximum(normality["shapiro_p"], floor), "x", ms=4, label="Shapiro-Wilk")
    left.axhline(normality["alpha"], color="red", lw=0.8, label=f"alpha = {normality['alpha']}")
    left.axhline(normality["alpha"] / len(idx), color="red", lw=0.8, ls="--", label="alpha / L (Bonferroni)")
    left.set_xlabel("layer (parameter order, kept layers)")
    left.set_ylabel("p-value of normality of log f_j")
    left.legend(fontsize=7)
    right.plot(idx, chi2["ks_lognormal"], ".", label="log f ~ normal")
    right.plot(idx, chi2["ks_chi2"], "x", ms=4, label="f ~ c chi2_k (MLE)")
    right.set_xlabel("layer (parameter order, kept layers)")
    right.set_ylabel("Kolmogorov-Smirnov distance")
    right.legend(fontsize=7)
    return fig
