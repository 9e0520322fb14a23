"""`lmcached keygen`: create a CURVE key pair for the daemon or a client.

Kept free of heavy imports: the security module loads only when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from lmcached.cli.commands import CommandTable, print_json


def register(commands: CommandTable) -> None:
    """Add `keygen`."""
    p = commands.add(
        "keygen",
        run_keygen,
        "create a CURVE key pair (NAME.key public, NAME.key_secret secret)",
        config_help=None,
        description=(
            "Create a ZMQ CURVE key pair for the daemon (name 'server') or for a client. "
            "Give the daemon server.key_secret (curve_secret_key_file); copy each client's "
            "NAME.key into the daemon's curve_authorized_keys folder; give each client its "
            "NAME.key_secret and the daemon's server.key."
        ),
    )
    p.add_argument("directory", help="folder to write the key files into (created 0750)")
    p.add_argument("name", nargs="?", default="server", help="key name (default: server)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_keygen(args: argparse.Namespace) -> int:
    from lmcached.security import keygen

    try:
        public, secret = keygen(args.directory, args.name, force=args.force)
    except (FileExistsError, ValueError, OSError) as exc:
        print(f"lmcached keygen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json({"public": str(public), "secret": str(secret)})
        return 0
    print(f"public key: {public}")
    print(f"secret key: {secret} (mode 0600: keep it with its owner only)")
    return 0
