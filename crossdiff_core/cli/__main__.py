"""`python -m crossdiff_core.cli`."""

from . import app

if __name__ == "__main__":
    app()
