"""What a client reads from a daemon's config file: where the daemon is, and how to talk to it.

A client does not validate the daemon's whole config: it needs none of the other keys, and a
daemon-side problem must not break an engine's client. :func:`load` reads the YAML with
``yaml.safe_load``, applies the ``LMCACHED_<KEY>`` environment overrides of the few keys a client
uses (through the config schema's own converters), and derives the instance folder with the
daemon's rule (:mod:`lmcached.runtime`), so it finds the daemon's ``endpoints.json``. Other keys
are ignored here; the daemon validates them when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmcached import config as config_mod
from lmcached.errors import ConfigError
from lmcached.runtime import default_runtime_dir, derived_instance_name

__all__ = ["ClientSettings", "load"]

DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_INSTANCE_NAME = "default"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The client's share of a daemon config file."""

    source: str
    runtime_dir: str
    instance_name: str
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    curve_client_key_file: str | None = None
    curve_server_key_file: str | None = None
    # On the daemon's host a client may use the daemon's own key pair (see ClientCurve).
    curve_secret_key_file: str | None = None

    @property
    def instance_dir(self) -> str:
        return os.path.join(self.runtime_dir, self.instance_name)


# The keys a client reads, each through the daemon config's own converter, so both sides read
# a value the same way.
_KEYS = (
    "runtime_dir",
    "instance_name",
    "request_timeout",
    "curve_client_key_file",
    "curve_server_key_file",
    "curve_secret_key_file",
)


def load(
    path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> ClientSettings:
    """Read the client's keys from the config file at ``path`` plus env overrides.

    ``path`` None: the built-in defaults plus env overrides, as ``lmcached start`` without
    ``--config`` runs (its instance is named ``default``).
    """
    source, data = ("", {}) if path is None else _read(Path(path))
    raw: dict[str, Any] = {k: data[k] for k in _KEYS if k in data}
    overrides = config_mod.env_overrides(os.environ if environ is None else environ)
    raw.update({k: v for k, v in overrides.items() if k in _KEYS})
    values: dict[str, Any] = {}
    for key in _KEYS:
        if raw.get(key) is None:
            continue
        try:
            values[key] = config_mod.converter(key)(raw[key])
        except ValueError as exc:
            raise ConfigError(key, str(exc), source) from None
    return ClientSettings(
        source=source,
        runtime_dir=values.pop("runtime_dir", None) or default_runtime_dir(),
        # The daemon's rule (Config.effective_instance_name): named after the file, else default.
        instance_name=values.pop("instance_name", None)
        or (derived_instance_name(source) if source else DEFAULT_INSTANCE_NAME),
        **values,
    )


def _read(p: Path) -> tuple[str, Mapping[str, Any]]:
    """Return the absolute path and the top-level mapping of the YAML file at ``p``."""
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {p}: {exc.strerror}") from None
    source = str(p.absolute())
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"not valid YAML: {exc}".replace("\n", " "), source) from None
    if not isinstance(data, Mapping):
        raise ConfigError(
            "<file>",
            f"expected a mapping of keys at the top level, got {type(data).__name__}",
            source,
        )
    return source, data
