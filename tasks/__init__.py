"""tasks package: grows with the pipeline (DESIGN §3)."""
