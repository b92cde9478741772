"""The `crossdiff` command line. Each command is a thin wrapper over a core function."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="crossdiff: diff a base and a fine-tuned model with crosscoders.")

# --- commands (each helper adds its own below; keep imports inside the functions so `--help` is fast) ---


if __name__ == "__main__":
    app()
