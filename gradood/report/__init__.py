"""Self-contained HTML and Markdown reports: generic building blocks and the evaluation-grid report."""

from gradood.report.evaluation import write_evaluation_report
from gradood.report.html import (
    figure_data_uri,
    format_cell,
    html_list,
    html_page,
    html_table,
    image_data_uri,
    markdown_escape,
    markdown_table,
    png_data_uri,
    save_figure,
)

__all__ = [
    "figure_data_uri",
    "format_cell",
    "html_list",
    "html_page",
    "html_table",
    "image_data_uri",
    "markdown_escape",
    "markdown_table",
    "png_data_uri",
    "save_figure",
    "write_evaluation_report",
]
