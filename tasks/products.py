"""File names of the stages' products inside their output directories (``paths.*`` in params.yaml).

Imports nothing on purpose: a flow that only names another stage's product (the cache stage reading
the locate stage's ``recommended.json``) imports this module, not that stage's task, so the other
stage's code stays out of its import closure, which is its dvc.yaml code deps (tests/test_dvc_closure.py)."""

LATENTS = "latents.parquet"  # analyze: one row per latent
SUMMARY = "latents.summary.json"  # analyze: where crossdiff_core.runs.default_summary_path puts it
PLOTS = "plots"  # analyze: its figures
LOCATE = "locate.json"  # locate: the per-block sweep
PLOT = "locate.png"  # locate: its figure
RECOMMENDED = "recommended.json"  # locate: the recommendation alone, the cache stage's dependency
KL_FILE = "kl.json"  # evaluate: the KL gap per latent set
STEERING = "steering.json"  # steer: the steering results
TRACKING = "tracking.parquet"  # steer: which latents track the behaviours
SCOREBOARD = "scoreboard.json"  # scoreboard: every method scored against the known behaviours
LENS_FILE = "lens.json"  # scoreboard: the activation-difference lens it scored (lens.safetensors beside it)
