"""The researcher's report: one self-contained HTML page per pipeline run comparing crosscoders (e.g. L1
and BatchTopK) side by side, plus the same figures as PNG and the numbers as JSON (DVC plots/metrics).

- :mod:`.inputs`: what the report reads about each crosscoder (:class:`RunInputs`, :func:`load_run`);
- :mod:`.numbers`: ``report.json``, the KL table and the verdicts on the planted behaviours;
- :mod:`.figures`: every PNG plot (also the analysis stage's);
- :mod:`.page`: the HTML page (``templates/report.html.j2``) and :func:`build_report`.

Import from the submodules: the package itself imports nothing, so the analysis stage can draw its plots
with :mod:`.figures` without loading the page, the verdicts and the stages they read.
"""
