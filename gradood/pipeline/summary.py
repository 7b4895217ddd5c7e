"""The run's summary: counts, top-10, flags at the FDR target, and on the demo corpus the ranking's quality
per OOD source (the demo's folders are its labels)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from gradood.core.progress import progress

BASELINE = "score:typicality"


def demo_sources(scores: pa.Table) -> np.ndarray:
    """The demo source of every scored row; a set straddling two source folders is ``mixed``."""
    from gradood.data.demo import demo_source_of

    if "member_ids" in scores.column_names:
        members = scores.column("member_ids").to_pylist()
    else:
        members = [[i] for i in scores.column("id").to_pylist()]
    labels = [{demo_source_of(m) for m in group} for group in members]
    return np.array([next(iter(s)) if len(s) == 1 else "mixed" for s in labels])


def demo_report(scores: pa.Table, test: str) -> dict[str, Any]:
    """Metrics of the chosen test and of the typicality baseline, held-out FashionMNIST vs each OOD
    source, and how many rows of each source were flagged."""
    from gradood.data.demo import DEMO_ID_SOURCE, DEMO_OOD_SOURCES
    from gradood.stats.metrics import CONVENTION, ood_metrics

    sources = demo_sources(scores)
    flagged = scores.column("flagged").to_numpy(zero_copy_only=False)
    report: dict[str, Any] = {
        "convention": CONVENTION,
        "test": test,
        "sources": {},
        "mixed_sets_left_out": int((sources == "mixed").sum()),
        "flagged": {
            name: int(flagged[sources == name].sum()) for name in (DEMO_ID_SOURCE, *DEMO_OOD_SOURCES)
        },
    }
    n_flagged = int(flagged[sources != "mixed"].sum())
    id_flagged = report["flagged"][DEMO_ID_SOURCE]
    report["false_discoveries"] = id_flagged
    report["false_discovery_proportion"] = id_flagged / n_flagged if n_flagged else 0.0
    report["rows"] = {name: int((sources == name).sum()) for name in (DEMO_ID_SOURCE, *DEMO_OOD_SOURCES)}
    report["ood_share"] = {
        name: report["rows"][name] / max(1, int((sources != "mixed").sum())) for name in DEMO_OOD_SOURCES
    }
    report["power"] = {
        name: report["flagged"][name] / report["rows"][name] if report["rows"][name] else 0.0
        for name in DEMO_OOD_SOURCES
    }
    for name in DEMO_OOD_SOURCES:
        row: dict[str, Any] = {}
        for column in ("ood_score", BASELINE):
            s = scores.column(column).to_numpy()
            m = ood_metrics(s[sources == DEMO_ID_SOURCE], s[sources == name])
            m.pop("convention")
            row[column] = m
        report["sources"][name] = row
    return report


def print_summary(summary: dict[str, Any]) -> None:
    for warning in summary.get("warnings", []):
        progress(f"WARNING: {warning}")
    progress(
        f"scored {summary['scored']} + rejected {summary['rejected']} = {summary['inputs']} inputs "
        f"({summary['feature_rows']} feature rows, group_size {summary['group_size']}) -> {summary['output']}"
    )
    if summary["skipped"] or summary["resumed_shards"] or summary["incomplete_sets"]:
        progress(
            f"skipped {summary['skipped']} files {summary['skipped_reasons']}; resumed "
            f"{summary['resumed_shards']} shards; {summary['incomplete_sets']} incomplete sets (not flagged)"
        )
    progress(
        f"flagged {summary['flagged']} of {summary['feature_rows']} rows at a false-discovery rate of "
        f"{summary['fdr']} ({summary['fdr_method']}, test {summary['test']})"
    )
    floor = summary["prevalence_floor"]
    progress(
        f"prevalence floor: flags can fire only on a night with at least {100 * floor['share']:.2f} % OOD "
        f"rows (smallest p-value {floor['min_p_value']:.2g} from {floor['n_calibration']} calibration rows "
        f"at fdr {floor['fdr']:g}, {floor['method']}); more calibration rows lower it"
    )
    if summary["flagged_by_driver"]:
        drivers = ", ".join(f"{name} {n}" for name, n in summary["flagged_by_driver"].items())
        progress(f"flagged rows by the test that drove their p-value: {drivers}")
    trained = summary["adaptive_training_rows"]
    if trained:
        progress(
            f"adaptive combination: calibration part 1 ({trained['reference']} rows) against "
            f"{trained['night']} of the night's rows and {trained['part_2']} of part 2"
        )
    drift = summary["drift"]
    if drift["p_value"] is not None:
        progress(
            f"drift test (night vs calibration, {drift['test']}): p = {drift['p_value']:.3g}, "
            f"P(night > calibration) = {drift['effect']:.3f}"
        )
    progress(f"report: {summary['output']}/report.html")
    progress("top-10 most OOD: " + ", ".join(summary["top10"]))
    if "demo" not in summary:
        return
    demo = summary["demo"]
    progress("demo ranking, FashionMNIST (held out) vs each OOD source; AUROC = P(s_OOD > s_ID) + P(tie)/2,")
    progress(
        "FPR@95 = share of OOD rows accepted at the threshold that accepts 95% of ID rows (ID positive):"
    )
    name = demo["test"]
    progress(
        f"  {'OOD source':<24}{'share':>7}{'AUROC ' + name:>16}{'AUROC typicality':>18}"
        f"{'FPR@95 ' + name:>17}{'flagged':>9}{'power':>7}"
    )
    for source, row in demo["sources"].items():
        progress(
            f"  {source:<24}{100 * demo['ood_share'][source]:>6.1f}%{row['ood_score']['auroc']:>16.4f}"
            f"{row[BASELINE]['auroc']:>18.4f}{row['ood_score']['fpr_at_95_tpr']:>17.4f}"
            f"{demo['flagged'][source]:>9}{demo['power'][source]:>7.2f}"
        )
    progress(
        f"  false discoveries (held-out FashionMNIST rows flagged): {demo['false_discoveries']} of "
        f"{demo['rows']['fashion_mnist']}; false-discovery proportion of the flags "
        f"{demo['false_discovery_proportion']:.4f} (target <= {summary['fdr']} on average over nights)"
    )
