"""The analysis report: claims of the paper against the numbers, a self-contained HTML page, Markdown,
PNGs and ``analysis.json``. Every sentence about a claim is computed from the results it summarises."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradood.analysis import figures
from gradood.analysis.figures import SOURCE_LABEL
from gradood.analysis.fisher import diagonal_dominance
from gradood.core import storage
from gradood.report.html import html_page, html_table, markdown_table, png_data_uri, save_figure

#: Prop. 1 "holds to float tolerance" below these (float64; relative feature error, shift error relative
#: to the largest |log p|)
INVARIANCE_TOLERANCE = 1e-8


def jsonable(value: Any) -> Any:
    """numpy values and arrays to plain JSON values; NaN and inf to None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _sci(value: float) -> str:
    """Two significant digits: p-values and tolerances span many orders of magnitude."""
    return f"{value:.2g}"


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _claim(claim: str, rule: str, verdict: str, numbers: dict[str, Any], text: str) -> dict[str, Any]:
    return {"claim": claim, "rule": rule, "verdict": verdict, "numbers": numbers, "text": text}


def _fisher_claim(fim: dict[str, Any]) -> dict[str, Any]:
    ratios = [e["dominance"] for e in fim["layers"].values() if "dominance" in e]
    nulls = [e["null_dominance"] for e in fim["layers"].values() if "dominance" in e]
    pooled = fim["pooled"]
    text = (
        f"Over {fim['n']} {SOURCE_LABEL[fim['source']]}, mean |F_ii| is {min(ratios):.1f}-"
        f"{max(ratios):.1f}x the mean off-diagonal |F_ik| in the {len(ratios)} slices (median "
        f"{_median(ratios):.1f}x); independent coordinates with the same marginals would give a median "
        f"{_median(nulls):.1f}x at this sample size. Normalised |F_ik| averages "
        f"{pooled['within_layers']:.3f} within a layer and {pooled['across_layers']:.3f} across layers."
    )
    keys = ("dominance", "null_dominance", "within_layers", "across_layers")
    return _claim(
        "The Fisher information is close to diagonal (paper Fig. 5)",
        "supported when mean |F_ii| > mean |F_ik| (i != k) in every slice",
        "supported" if ratios and min(ratios) > 1 else "not supported",
        {"dominance": ratios, "null_dominance": nulls, "pooled": {k: pooled[k] for k in keys}},
        text,
    )


def _normality_claim(lay: dict[str, Any]) -> dict[str, Any]:
    nt, chi2 = lay["normality"], lay["chi2"]
    n_layers = len(nt["normaltest_p"])
    valid = np.isfinite(chi2["ks_chi2"]) & np.isfinite(chi2["ks_lognormal"])
    lognormal_better = int(np.sum(chi2["ks_lognormal"][valid] < chi2["ks_chi2"][valid]))
    text = (
        f"On {nt['n']} fit rows, {nt['share_normaltest']:.0%} of the {n_layers} layers pass "
        f"D'Agostino's K^2 at alpha={nt['alpha']} ({nt['share_normaltest_bonferroni']:.0%} with "
        f"Bonferroni over layers; Shapiro-Wilk {nt['share_shapiro']:.0%} / "
        f"{nt['share_shapiro_bonferroni']:.0%}); median |skew| {np.median(np.abs(nt['skew'])):.2f}, "
        f"median excess kurtosis {np.median(nt['excess_kurtosis']):.2f}. The log-normal is closer (KS) "
        f"than the MLE scaled chi-square in {lognormal_better} of {int(valid.sum())} layers (median "
        f"fitted k {np.nanmedian(chi2['k_mle']):.1f})."
    )
    numbers = {k: nt[k] for k in nt if k.startswith("share_")}
    numbers |= {"alpha": nt["alpha"], "n": nt["n"], "layers": n_layers}
    numbers["lognormal_better_than_chi2"] = lognormal_better
    return _claim(
        "log f_j is close to normal on in-distribution data",
        "supported when most layers are not rejected by K^2 after Bonferroni over layers",
        "supported" if nt["share_normaltest_bonferroni"] > 0.5 else "not supported",
        numbers,
        text,
    )


def _correlation_claim(c: dict[str, Any]) -> dict[str, Any]:
    text = (
        f"Mean |rho| is {c['near']:.2f} between adjacent layers and {c['far']:.2f} at distances of at "
        f"least half the network (a drop of {c['near'] - c['far']:.2f}); Spearman(d, |rho|) = "
        f"{c['spearman']:.2f} (permutation p = {c['p_value']:.3g})."
    )
    return _claim(
        "Correlation between layers' log-norms decays with their distance in the network (Fig. 6)",
        "supported when Spearman(d, |rho|) < 0 with layer-order permutation p < 0.05",
        "supported" if c["spearman"] < 0 and c["p_value"] < 0.05 else "not supported",
        {k: c[k] for k in ("spearman", "p_value", "near", "far")},
        text,
    )


def _invariance_claim(inv: dict[str, Any]) -> dict[str, Any]:
    rel = max(v["max_rel_feature_diff"] for v in inv.values())
    shift = max(v["max_shift_error"] / max(v["max_abs_log_prob"], 1.0) for v in inv.values())
    ctrl = min(v["control_max_rel_feature_diff"] for v in inv.values())
    log_dets = ", ".join(f"{v['log_det_min']:.0f} to {v['log_det_max']:.0f}" for v in inv.values())
    first = next(iter(inv.values()))
    text = (
        f"Under the {' and '.join(inv)} maps ({first['rows']} rows, {first['dtype']}, input: "
        f"{first['input']}) the per-layer features differ by at most {rel:.1e} (relative) while log p moves "
        f"by the log-det ({log_dets} nats) up to {shift:.1e} (relative); moving each pixel by one level "
        f"changes the features by up to {ctrl:.2g} (relative)."
    )
    tol = INVARIANCE_TOLERANCE
    return _claim(
        "Gradient features are invariant to an invertible reparameterisation of the input (Prop. 1)",
        f"holds when features agree and log p shifts by the log-det to {tol:g} (relative)",
        "holds" if rel < tol and shift < tol else "fails",
        {"max_rel_feature_diff": rel, "max_rel_shift_error": shift, "control": ctrl},
        text,
    )


def _separation_claim(per_b: dict[int, Any]) -> dict[str, Any]:
    sep = {b: float(np.mean(e["separation"]["separation"])) for b, e in per_b.items()}
    larger = [b for b in sep if b > 1]
    values = ", ".join(f"B={b}: {v:.3f}" for b, v in sep.items())
    return _claim(
        "Layer norms separate OOD from ID data, more so for sets of B > 1 images (Fig. 4)",
        "supported when the mean over layers of |2 AUROC - 1| grows with B",
        "supported" if larger and all(sep[b] > sep[1] for b in larger) else "not supported",
        {"mean_separation": sep},
        f"Mean over layers and OOD sources of |2 AUROC - 1| of log f_j alone: {values}.",
    )


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per claim: the claim, the measured numbers, a verdict by a stated rule, one sentence."""
    lay = results["layers"]
    return [
        _fisher_claim(results["fisher"]),
        _normality_claim(lay),
        _correlation_claim(lay["correlation"]),
        _invariance_claim(results["invariance"]),
        _separation_claim(lay["per_group_size"]),
    ]


def _figure_list(results: dict[str, Any]) -> list[tuple[str, Any, str]]:
    lay = results["layers"]
    kept, shown, cols = lay["kept"], lay["shown"], lay["shown_columns"]
    out = []
    for b, entry in lay["per_group_size"].items():
        out.append((f"histograms_b{b}.png", figures.histogram_figure(entry, shown, b),
                    f"Fig. 4: log f_j per source, B={b}"))  # fmt: skip
    # the two most separating layers (or the shown ones; any two layers for a tiny model)
    a, b2 = cols[:2] if len(cols) >= 2 else (0, min(1, len(kept) - 1))
    out.append(("scatter_b1.png", figures.scatter_figure(lay["per_group_size"][1], a, b2, kept, 1),
                "Two layers' log f_j against each other, B=1"))  # fmt: skip
    out.append(
        ("fisher_slices.png", figures.fisher_figure(results["fisher"]), "Fig. 5: normalised FIM slices")
    )
    out.append(
        ("correlation_decay.png", figures.correlation_figure(lay["correlation"]), "Fig. 6: correlation decay")
    )
    out.append(("qq.png", figures.qq_figure(lay["fit_logs"], cols, kept, lay["normality"]), "QQ plots"))
    out.append(
        ("normality.png", figures.normality_figure(lay["normality"], lay["chi2"]), "Normality per layer")
    )
    return out


def _layer_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    lay = results["layers"]
    nt, chi2, per_b = lay["normality"], lay["chi2"], lay["per_group_size"]
    header = [
        "layer",
        "K^2 p",
        "Shapiro p",
        "skew",
        "ex. kurt",
        "k (MLE)",
        "c (MLE)",
        "KS chi2",
        "KS lognormal",
    ]
    header += [f"sep B={b}" for b in per_b]
    rows = []
    for j, name in enumerate(lay["kept"]):
        row = [
            name,
            _sci(nt["normaltest_p"][j]),
            _sci(nt["shapiro_p"][j]),
            nt["skew"][j],
            nt["excess_kurtosis"][j],
        ]
        row += [chi2["k_mle"][j], chi2["c_mle"][j], chi2["ks_chi2"][j], chi2["ks_lognormal"][j]]
        rows.append(row + [e["separation"]["separation"][j] for e in per_b.values()])
    return header, rows


def write_report(results: dict[str, Any], out: str, command: str) -> dict[str, Any]:
    """report.html (figures inline), report.md, the PNGs and analysis.json under ``out``."""
    found = claims(results)
    figs = []
    for filename, fig, caption in _figure_list(results):
        figs.append((filename, png_data_uri(save_figure(fig, Path(out) / filename)), caption))
    claim_rows = [[c["claim"], c["verdict"], c["text"], c["rule"]] for c in found]
    claim_header = ["claim", "verdict", "what the numbers say", "rule"]
    fim = results["fisher"]
    fim_rows = [[n, e["k"], e.get("dominance"), e.get("null_dominance"), e.get("normalised_dominance")]
                for n, e in fim["layers"].items()]  # fmt: skip
    pooled = fim["pooled"]
    pooled_row = [len(pooled["labels"]), pooled["dominance"], pooled["null_dominance"]]
    fim_rows.append(["pooled (all of them)", *pooled_row, diagonal_dominance(pooled["normalised"])])
    fim_header = ["layer", "weights", "diag/off-diag", "null (independent)", "normalised ratio"]
    keys = (
        "max_rel_feature_diff",
        "max_shift_error",
        "log_det_min",
        "log_det_max",
        "control_max_rel_feature_diff",
    )
    inv_rows = [[k, *(_sci(v[key]) for key in keys)] for k, v in results["invariance"].items()]
    inv_header = ["map", "max rel. feature diff", "max |shift - log-det|", "log-det min", "log-det max",
                  "one-level control"]  # fmt: skip
    layer_header, layer_rows = _layer_rows(results)
    m = results["model"]
    model = f"<code>{html.escape(m['name'])}</code> ({m['fingerprint'][:12]}, {html.escape(m['checkpoint'])})"
    intro = (
        f"<p>Model {model}; command <code>{html.escape(command)}</code>. Corpus rows per source: "
        f"{html.escape(str(results['corpus']['counts']))}; fit rows {results['layers']['fit_rows']}. "
        f"FIM over {fim['n']} {SOURCE_LABEL[fim['source']]} ({html.escape(fim['why'])}"
        + (f"; {fim['discarded_samples']} non-finite samples redrawn" if fim["source"] == "samples" else "")
        + ").</p>"
    )
    fig_html = {
        f: f'<figure><img src="{uri}" alt="{f}"><figcaption>{html.escape(c)} ({f})</figcaption></figure>'
        for f, uri, c in figs
    }
    sections = [
        ("Claims of the paper against the numbers", html_table(claim_header, claim_rows)),
        (
            "Layer histograms (Fig. 4)",
            "".join(v for k, v in fig_html.items() if k.startswith(("hist", "scat"))),
        ),
        ("FIM slices (Fig. 5)", html_table(fim_header, fim_rows) + fig_html["fisher_slices.png"]),
        ("Correlation decay (Fig. 6)", fig_html["correlation_decay.png"]),
        ("Normality and the scaled chi-square", fig_html["qq.png"] + fig_html["normality.png"]),
        ("Representation invariance (Prop. 1)", html_table(inv_header, inv_rows)),
        ("Per-layer statistics", html_table(layer_header, layer_rows)),
    ]
    page = html_page(f"gradood analysis: {m['name']}", sections, intro=intro)
    md = [
        f"# gradood analysis: {m['name']}",
        "",
        f"`{command}`",
        "",
        markdown_table(claim_header, claim_rows),
        "",
    ]
    md += ["## FIM slices", "", markdown_table(fim_header, fim_rows), "", "## Invariance", ""]
    md += [markdown_table(inv_header, inv_rows), "", "## Figures", ""]
    md += [f"![{c}]({f})" for f, _, c in figs]
    paths = {
        k: storage.join(out, f)
        for k, f in (("html", "report.html"), ("markdown", "report.md"), ("json", "analysis.json"))
    }
    storage.write_text(paths["html"], page)
    storage.write_text(paths["markdown"], "\n".join(md) + "\n")
    # the numbers without the raw log-norm matrices (those are in the features Parquet files)
    numbers = {k: v for k, v in results.items() if k != "layers"}
    numbers["layers"] = {k: v for k, v in results["layers"].items() if k != "fit_logs"}
    numbers["layers"]["per_group_size"] = {
        b: {k: v for k, v in e.items() if k != "logs"} for b, e in results["layers"]["per_group_size"].items()
    }
    storage.write_json(paths["json"], jsonable({"claims": found, **numbers}))
    headline = [f"{c['verdict']}: {c['claim']}. {c['text']}" for c in found]
    return {**paths, "figures": [f for f, _, _ in figs], "headline": headline, "claims": found}
