"""The `lmcached` command line: one parser, one module per command family.

:mod:`lmcached.cli.commands` is the command table and the shared helpers; each command module
registers into it; :mod:`lmcached.cli.main` builds the parser and dispatches.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run `lmcached` (see :func:`lmcached.cli.main.main`)."""
    # Imported on call, so `python -m lmcached.cli.plugins` does not load its own module twice.
    from lmcached.cli.main import main as run

    return run(argv)


__all__ = ["main"]
