"""flows package: grows with the pipeline (DESIGN §3)."""
