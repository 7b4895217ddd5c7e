import base64
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from matplotlib.figure import Figure
from PIL import Image

from gradood.report import (
    figure_data_uri,
    format_cell,
    html_page,
    html_table,
    image_data_uri,
    markdown_table,
    write_evaluation_report,
)

FAMILIES = ["vae", "glow"]
GROUP_SIZES = [4, 1]  # out of order on purpose: the report lists group sizes ascending
SOURCES = [("mnist", True), ("svhn_gray", True), ("fmnist_blur", False)]  # not alphabetical
TESTS = ["gradnorm", "typicality", "loglik"]
DEFAULT = "typicality"  # appears second: the report must move it first
TEST_ORDER = [DEFAULT, "gradnorm", "loglik"]


def _metric_row(rng, family, g, source, far, test):
    n_flagged = int(rng.integers(0, 30))
    return {
        "family": family, "group_size": g, "source": source, "far_ood": far, "test": test,
        "auroc": rng.uniform(0.5, 1.0), "aupr_in": rng.uniform(), "aupr_out": rng.uniform(),
        "fpr_at_95_tpr": rng.uniform(), "n_id": 60, "n_ood": 40,
        "flag_fdr": rng.uniform(0, 0.2) if n_flagged else math.nan,  # NaN: nothing flagged
        "flag_power": n_flagged / 40, "n_flagged": n_flagged,
    }  # fmt: skip


def _tables(tests=TESTS, seed=0):
    rng = np.random.default_rng(seed)
    metrics, scores = [], []
    parts = [("fashion_mnist", False, 0.0, 60)] + [(s, True, 1.0 + k, 40) for k, (s, _) in enumerate(SOURCES)]
    for family in FAMILIES:
        for g in GROUP_SIZES:
            metrics += [_metric_row(rng, family, g, s, far, d) for s, far in SOURCES for d in tests]
            for d in tests:
                for source, is_ood, shift, n in parts:
                    key = dict(family=family, group_size=g, test=d, source=source, is_ood=is_ood)
                    scores += [
                        {**key, "ood_score": x, "p_value": rng.uniform()} for x in rng.normal(shift, 1, n)
                    ]
    # an exact tie for the best AUROC of one row: both cells must be bold
    tie = [m for m in metrics if (m["family"], m["group_size"], m["source"]) == ("vae", 1, "mnist")]
    tie[0]["auroc"] = tie[-1]["auroc"] = 1.0
    return pa.Table.from_pylist(metrics), pa.Table.from_pylist(scores)


def _lookup(metrics, family, g, source, test):
    (row,) = [m for m in metrics.to_pylist() if (m["family"], m["group_size"], m["source"], m["test"])
              == (family, g, source, test)]  # fmt: skip
    return row


def _write(tmp_path, metrics, scores, notes=("first note", "second note")):
    return write_evaluation_report(
        metrics, scores, str(tmp_path), title="Eval <grid>", command="python -m gradood.eval --grid",
        default_test=DEFAULT, fdr_target=0.1, notes=notes,
    )  # fmt: skip


class _Tables(HTMLParser):
    """An HTML page's tables, {section heading: [{caption, header, rows of (text, bold)}]}, and img srcs."""

    def __init__(self):
        super().__init__()
        self.sections, self.srcs, self._heading, self._text, self._bold = {}, [], None, None, False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        elif tag == "table":
            self.sections.setdefault(self._heading, []).append({"caption": None, "header": [], "rows": []})
        elif tag == "tr":
            self.sections[self._heading][-1]["rows"].append([])
        elif tag in ("h2", "caption", "th", "td"):
            self._text, self._bold = "", False
        elif tag == "strong":
            self._bold = True

    def handle_data(self, data):
        if self._text is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "h2":
            self._heading, self._text = self._text, None
        elif tag == "table":
            table = self.sections[self._heading][-1]
            table["rows"] = [r for r in table["rows"] if r]  # the header's <tr> holds no <td>
        elif tag in ("caption", "th", "td"):
            table = self.sections[self._heading][-1]
            if tag == "caption":
                table["caption"] = self._text
            elif tag == "th":
                table["header"].append(self._text)
            else:
                table["rows"][-1].append((self._text, self._bold))
            self._text = None


def _parse_html(text):
    parser = _Tables()
    parser.feed(text)
    return parser


def _md_unescape(cell):
    return re.sub(r"\\(.)", r"\1", cell.removeprefix("**").removesuffix("**"))


def _markdown_tables(text):
    """{section heading: [(header, rows of (text, bold))]}, checking every row has the header's width."""
    sections, heading, block = {}, None, []
    for line in text.splitlines() + [""]:
        if line.startswith("## "):
            heading = line[3:]
        if line.startswith("|"):
            block.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
            continue
        if block:
            header, sep, *rows = block
            assert all(len(r) == len(header) for r in block), block
            assert all(c == "---" for c in sep)
            cells = [[(_md_unescape(c), c.startswith("**")) for c in r] for r in rows]
            sections.setdefault(heading, []).append(([_md_unescape(h) for h in header], cells))
            block = []
    return sections


def test_evaluation_report_files_and_self_contained(tmp_path):
    metrics, scores = _tables()
    out = _write(tmp_path, metrics, scores)
    assert Path(out["markdown"]).is_file() and Path(out["html"]).is_file()
    assert [Path(f).name for f in out["figures"]] == [f"roc_{f}_g{g}.png" for f in FAMILIES for g in (1, 4)]
    page = Path(out["html"]).read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    parser = _parse_html(page)
    assert len(parser.srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert re.findall(r'src="([^"]*)"', page) == parser.srcs
    # the inline figures are the PNG files, byte for byte, and decode as images
    for src, path in zip(parser.srcs, out["figures"], strict=True):
        png = base64.b64decode(src.split(",", 1)[1])
        assert png == Path(path).read_bytes()
        assert Image.open(io.BytesIO(png)).size[0] > 300
    for name in FAMILIES + [s for s, _ in SOURCES] + TESTS + ["first note", "second note"]:
        assert name in page
    assert "Eval &lt;grid&gt;" in page and "python -m gradood.eval --grid" in page
    md = Path(out["markdown"]).read_text()
    for f in out["figures"]:
        assert f"({Path(f).name})" in md


def test_evaluation_report_auroc_tables_match_metrics(tmp_path):
    metrics, scores = _tables()
    out = _write(tmp_path, metrics, scores)
    sections = _parse_html(Path(out["html"]).read_text()).sections
    assert list(sections) == ["Summary"] + [f"{f}, group size {g}" for f in FAMILIES for g in (1, 4)]
    for f in FAMILIES:
        for g in GROUP_SIZES:
            (auroc_table,) = [t for t in sections[f"{f}, group size {g}"] if t["caption"].startswith("AUROC")]
            assert auroc_table["header"] == [
                "source",
                "near/far",
                f"{DEFAULT} (default)",
                *TEST_ORDER[1:],
            ]
            assert [r[0][0] for r in auroc_table["rows"]] == [s for s, _ in SOURCES]
            for (source, far), row in zip(SOURCES, auroc_table["rows"], strict=True):
                assert row[1] == ("far" if far else "near", False)
                values = [_lookup(metrics, f, g, source, d)["auroc"] for d in TEST_ORDER]
                assert [text for text, _ in row[2:]] == [f"{v:.3f}" for v in values]
                assert [bold for _, bold in row[2:]] == [v == max(values) for v in values]
    tied = next(t for t in sections["vae, group size 1"] if t["caption"].startswith("AUROC"))["rows"][0]
    assert [bold for _, bold in tied[2:]] == [False, True, True]  # gradnorm and loglik share 1.000


def test_evaluation_report_summary_and_flags(tmp_path):
    metrics, scores = _tables()
    out = _write(tmp_path, metrics, scores)
    sections = _parse_html(Path(out["html"]).read_text()).sections
    (summary,) = sections["Summary"]
    assert len(summary["rows"]) == 2 * len(FAMILIES) * len(GROUP_SIZES)
    for row in summary["rows"]:
        f, g, label = (c[0] for c in row[:3])
        far_only = label.startswith("far")
        assert label == ("far-OOD (2)" if far_only else "all OOD (3)")
        sources = [s for s, far in SOURCES if far or not far_only]
        means = [np.mean([_lookup(metrics, f, int(g), s, d)["auroc"] for s in sources]) for d in TEST_ORDER]
        assert [c[0] for c in row[3:]] == [f"{v:.3f}" for v in means]
        assert [c[1] for c in row[3:]] == [v == max(means) for v in means]
    (flags,) = [t for t in sections["glow, group size 4"] if t["caption"].startswith("Benjamini")]
    assert "0.1" in flags["caption"] and len(flags["rows"]) == 9
    for row in flags["rows"]:
        source, _, d, _, _, n_flagged, fdr, power = (c[0] for c in row)
        m = _lookup(metrics, "glow", 4, source, d)
        assert (n_flagged, power) == (str(m["n_flagged"]), f"{m['flag_power']:.3f}")
        assert fdr == format_cell(m["flag_fdr"])
        assert (fdr == "\u2013") == (m["n_flagged"] == 0)


def test_evaluation_markdown_holds_the_html_tables(tmp_path):
    metrics, scores = _tables()
    out = _write(tmp_path, metrics, scores)
    html_sections = _parse_html(Path(out["html"]).read_text()).sections
    md_sections = _markdown_tables(Path(out["markdown"]).read_text())
    assert list(md_sections) == list(html_sections)
    for heading, tables in html_sections.items():
        assert [(t["header"], t["rows"]) for t in tables] == md_sections[heading]
    assert "- first note" in Path(out["markdown"]).read_text()


def test_evaluation_report_escapes_names(tmp_path):
    metrics, scores = _tables(tests=["gradnorm", DEFAULT, "a<b&c"])
    out = _write(tmp_path, metrics, scores)
    page = Path(out["html"]).read_text()
    assert "a&lt;b&amp;c" in page and "a<b&c" not in page
    header = _parse_html(page).sections["Summary"][0]["header"]
    assert header[3:] == [f"{DEFAULT} (default)", "gradnorm", "a<b&c"]
    md = Path(out["markdown"]).read_text()
    assert "a\\<b&c" in md and "a<b&c" not in md
    assert _markdown_tables(md)["Summary"][0][0][3:] == header[3:]


@pytest.mark.parametrize(("table", "column"), [("metrics", "flag_power"), ("scores", "p_value")])
def test_evaluation_report_missing_column(tmp_path, table, column):
    metrics, scores = _tables()
    if table == "metrics":
        metrics = metrics.drop_columns([column, "auroc"])
        match = "metrics table lacks columns: auroc, flag_power"
    else:
        scores = scores.drop_columns([column])
        match = "scores table lacks columns: p_value"
    with pytest.raises(ValueError, match=match):
        _write(tmp_path, metrics, scores)
    assert not (tmp_path / "report.html").exists()


def test_evaluation_report_unknown_default_test(tmp_path):
    metrics, scores = _tables(tests=["gradnorm", "loglik"])
    with pytest.raises(ValueError, match="default test 'typicality'"):
        _write(tmp_path, metrics, scores)


def test_format_cell():
    assert format_cell(0.12345) == "0.123" and format_cell(np.float32(0.5)) == "0.500"
    assert format_cell(0.12345, digits=1) == "0.1"
    assert format_cell(3) == "3" and format_cell(np.int64(12)) == "12"
    assert format_cell(None) == "\u2013" and format_cell(math.nan) == "\u2013"
    assert format_cell(True) == "True" and format_cell("x<y") == "x<y"


def test_html_and_markdown_table():
    header, rows = ["name", "value"], [["a<b", 0.5], ["c|d", None], ["e", 7]]
    table = html_table(header, rows, bold={(0, 1)}, caption="T & U")
    assert "<caption>T &amp; U</caption>" in table
    assert '<td>a&lt;b</td><td class="num"><strong>0.500</strong></td>' in table
    assert "<td>c|d</td><td>\u2013</td>" in table and '<td class="num">7</td>' in table
    assert table.count("<strong>") == 1
    md = markdown_table(header, rows, bold={(2, 0)})
    assert md.splitlines() == [
        "| name | value |", "| --- | --- |", "| a\\<b | 0.500 |", "| c\\|d | \u2013 |", "| **e** | 7 |",
    ]  # fmt: skip
    cells = [
        [("a<b", False), ("0.500", False)],
        [("c|d", False), ("\u2013", False)],
        [("e", True), ("7", False)],
    ]
    assert _markdown_tables(md)[None] == [(header, cells)]


def test_html_page_is_complete_and_escapes_headings():
    page = html_page("A & B", [("One <1>", "<p>body one</p>"), ("Two", "<p>body two</p>")], intro="<p>hi</p>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>A &amp; B</title>" in page and "<h2>One &lt;1&gt;</h2>" in page
    assert page.index("<p>hi</p>") < page.index("body one") < page.index("body two")
    assert "<style>" in page and "http" not in page


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (4, 6, 3)])
def test_image_data_uri_round_trip(shape):
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    uri = image_data_uri(array)
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.mode == ("RGB" if shape[-1] == 3 else "L")
    expected = array[:, :, 0] if shape[-1] == 1 else array
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_image_data_uri_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        image_data_uri(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        image_data_uri(np.zeros((4, 4, 2), np.uint8))


def test_figure_data_uri_decodes():
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [0, 1])
    image = Image.open(io.BytesIO(base64.b64decode(figure_data_uri(fig).split(",", 1)[1])))
    assert image.format == "PNG" and image.size[0] > image.size[1] > 0
