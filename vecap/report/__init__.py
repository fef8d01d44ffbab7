"""``vecap report``: one self-contained HTML page that shows what a dataset root holds.

Data and presentation are apart: :func:`load_report_data` reads a root into a
:class:`ReportData` (also what ``vecap inspect`` and the tests use), and
:func:`render_html` lays it out through an autoescaping Jinja2 template shipped in
``vecap/report/templates/``. :func:`build_report` does both and writes the file.

    python -m vecap.report data/sample            # -> data/sample/report.html
"""

from __future__ import annotations

from vecap.outputs import LegacyLayoutError
from vecap.report.data import ReportData, load_report_data, thumbnail_uri
from vecap.report.render import build_report, render_html

__all__ = ["LegacyLayoutError", "ReportData", "build_report", "load_report_data", "render_html", "thumbnail_uri"]
