"""The `vitkit` command-line interface."""

from vitkit.cli.main import main

__all__ = ["main"]
