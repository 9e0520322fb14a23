"""The `lmcached` command line: one parser, one module per command family."""

from lmcached.cli.main import main

__all__ = ["main"]
