"""Subcommands of the ``lungnode`` command, one module per area."""
