"""The researcher's report: one self-contained HTML page per pipeline run comparing crosscoders (e.g. L1
and BatchTopK) side by side, plus the same figures as PNG and the numbers as JSON (DVC plots/metrics).

- :mod:`.inputs`: what the report reads about each crosscoder (:class:`RunInputs`, :func:`load_run`);
- :mod:`.numbers`: ``report.json``, the KL table and the verdicts on the planted behaviours;
- :mod:`.figures`: every PNG plot (also the analysis stage's);
- :mod:`.page`: the HTML page (``templates/report.html.j2``) and :func:`build_report`.
"""

from .inputs import RunInputs, load_run
from .numbers import behaviour_verdict, kl_table, report_numbers
from .page import build_report

__all__ = ["RunInputs", "behaviour_verdict", "build_report", "kl_table", "load_run", "report_numbers"]
