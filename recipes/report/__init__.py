"""Seeing a run: read its directory (``rundata``), notice what is wrong (``findings``), draw it
(``plots``) and write report.html (``page``). ``finish_run`` does all of it at the end of a run."""
from recipes.report.findings import CHECKS, Finding, find_issues, format_findings
from recipes.report.page import Report, finish_run, write_report
from recipes.report.rundata import RunData, load_run

__all__ = ["RunData", "load_run", "Finding", "find_issues", "format_findings", "CHECKS", "Report", "write_report",
           "finish_run"]
