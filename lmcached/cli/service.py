"""`lmcached service install`: turn an installed lmcached into a systemd service.

The unit and the commented ``/etc`` config ship inside the package (``lmcached/cli/data``, the
same files as the repository's ``systemd/`` and ``config/``), so a wheel install needs no clone.
The command writes them under ``--root`` (``/`` by default; a staging folder for packagers, as
``DESTDIR``) with ``ExecStart`` pointing at this installation's ``lmcached``, and prints the
steps that need root and systemd (user, group, ``systemctl``): it runs none of them itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from lmcached.cli.commands import CommandTable, print_json

UNIT_NAME = "lmcached.service"
ETC_CONFIG_NAME = "lmcached.etc.yaml"
# Where the shipped unit expects the binary and the config; rewritten on install.
SHIPPED_BINARY = "/usr/local/bin/lmcached"
UNIT_DIR = "etc/systemd/system"
CONFIG_PATH = "/etc/lmcached/lmcached.yaml"


def register(commands: CommandTable) -> None:
    """Add the `service` family."""
    family = commands.group("service", "install lmcached as a systemd service")
    p = family.add(
        "install",
        cmd_service_install,
        "write the systemd unit and an example config from the installed package",
        config_help=None,
        description=__doc__,
    )
    p.add_argument(
        "--root", default="/", help="install under this folder instead of / (as DESTDIR)"
    )
    p.add_argument(
        "--bin",
        help="the lmcached executable ExecStart runs (default: the one next to this Python)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing config file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def packaged_file(name: str) -> str:
    """Return the text of a file shipped in ``lmcached/cli/data``."""
    return resources.files("lmcached.cli").joinpath("data").joinpath(name).read_text()


def default_binary() -> str:
    """The `lmcached` script of this installation, else the one on PATH, else the shipped path."""
    beside = Path(sys.executable).parent / "lmcached"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("lmcached") or SHIPPED_BINARY


def cmd_service_install(args: argparse.Namespace) -> int:
    root = Path(args.root)
    binary = args.bin or default_binary()
    unit = packaged_file(UNIT_NAME).replace(SHIPPED_BINARY, binary)
    unit_path = root / UNIT_DIR / UNIT_NAME
    config_path = root / CONFIG_PATH.lstrip("/")
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        _write(unit_path, unit, 0o644)
        config_written = args.force or not config_path.exists()
        if config_written:
            config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            # 0640: the config may name key files; the service's group reads it.
            _write(config_path, packaged_file(ETC_CONFIG_NAME), 0o640)
    except OSError as exc:
        print(f"lmcached service install: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
    steps = [
        "useradd --system --home-dir /var/lib/lmcached --shell /usr/sbin/nologin lmcached",
        f"chgrp lmcached {config_path.parent} {config_path}",
        "systemctl daemon-reload && systemctl enable --now lmcached",
    ]
    if args.json:
        print_json(
            {
                "unit": str(unit_path),
                "config": str(config_path),
                "config_written": config_written,
                "exec_start": binary,
                "next_steps": steps,
            }
        )
        return 0
    print(f"wrote {unit_path} (ExecStart={binary} start --config {CONFIG_PATH})")
    if config_written:
        print(f"wrote {config_path}")
    else:
        print(f"kept {config_path} (exists; --force replaces it)")
    print("then, as root:")
    for step in steps:
        print(f"  {step}")
    return 0


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so a reader never sees half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)
