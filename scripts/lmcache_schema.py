"""Write LMCache's config schema (keys, defaults, aliases) to a checked-in test fixture.

Run by hand when LMCache's schema moves:

    python scripts/lmcache_schema.py [--version 0.5.6] [--out tests/fixtures/...json]

It fetches the lmcache wheel with ``pip download --no-deps`` into a temporary folder and reads
``lmcache/v1/config.py`` from the wheel (a zip) without importing it: the module imports torch
and half of LMCache. The file's ``_CONFIG_DEFINITIONS`` and ``_CONFIG_ALIASES`` are read with
:mod:`ast`. CI never runs this; tests read the fixture it writes.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MEMBER = "lmcache/v1/config.py"


def download_wheel(version: str, into: Path) -> Path:
    """Fetch lmcache==version (no dependencies) into ``into``; return the wheel's path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(into),
            f"lmcache=={version}",
        ],
        check=True,
    )
    wheels = sorted(into.glob("lmcache-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no lmcache wheel in {into}")
    return wheels[0]


def _module_assignments(source: str) -> dict[str, ast.expr]:
    """Return the value expression of every top-level ``NAME = ...`` / ``NAME: T = ...``."""
    out: dict[str, ast.expr] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                out[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            out[node.target.id] = node.value
    return out


def _default_of(entry: ast.expr) -> Any:
    """Return a definition's default as JSON: the literal, or its source text when not one."""
    if not isinstance(entry, ast.Dict):
        return None
    for k, v in zip(entry.keys, entry.values, strict=True):
        if isinstance(k, ast.Constant) and k.value == "default":
            try:
                value = ast.literal_eval(v)
            except ValueError:
                return {"expr": ast.unparse(v)}  # e.g. float("inf")
            return value
    return None


def extract_schema(source: str) -> dict[str, Any]:
    """Return {"keys": {name: default}, "aliases": {old: new}} from LMCache's config.py."""
    assigned = _module_assignments(source)
    definitions = assigned.get("_CONFIG_DEFINITIONS")
    aliases = assigned.get("_CONFIG_ALIASES")
    if not isinstance(definitions, ast.Dict) or not isinstance(aliases, ast.Dict):
        raise SystemExit("_CONFIG_DEFINITIONS or _CONFIG_ALIASES is not a dict literal any more")
    keys = {
        ast.literal_eval(k): _default_of(v)
        for k, v in zip(definitions.keys, definitions.values, strict=True)
        if k is not None
    }
    return {"keys": keys, "aliases": ast.literal_eval(aliases)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.5.6")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or ROOT / "tests" / "fixtures" / (
        f"lmcache_{args.version.replace('.', '_')}_config_keys.json"
    )
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(args.version, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            source = zf.read(CONFIG_MEMBER).decode()
    schema = {"lmcache_version": args.version, "source": CONFIG_MEMBER, **extract_schema(source)}
    out.write_text(json.dumps(schema, indent=2, sort_keys=False) + "\n")
    print(f"{out}: {len(schema['keys'])} keys, {len(schema['aliases'])} aliases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
