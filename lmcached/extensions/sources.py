"""Where registry entries come from, besides the built-in manifest.

1. **Entry points** (vLLM's and AIPerf's style): the group ``lmcached.plugins``. Each entry
   point names either a YAML manifest inside a package (``my_pkg:plugins.yaml``) or a register
   function (``my_pkg.reg:register``) called with the registry. vLLM's two process-level
   groups map onto categories of the same registry: ``lmcached.general_plugins`` (each value a
   callable, category ``general``) and ``lmcached.stat_logger_plugins`` (each value a class,
   category ``stat_logger``), registered under the entry point's name without importing it.
   ``LMCACHED_PLUGINS``, a comma-separated list of entry-point (or distribution) names, limits
   which ones load in every group; set but empty means none.
2. **LMCache-style config** (seed 003): ``external_backends`` with
   ``extra_config: external_backend.<name>.module_path / .class_name`` and
   ``external_connector.<scheme>.module_path / .class_name``; ``storage_plugins`` /
   ``storage_plugin.<name>.*`` are accepted as deprecated aliases. Any other
   ``<prefix>.<name>.<option>`` key becomes an option of that plugin.

Loading is idempotent per process (:func:`load`): the scheduler and each worker (and
``lmcached config check`` or ``lmcached plugins``) load once, and a forked child loads again
because its pid differs. The scheduler loads so that it can run general plugins and stat
loggers; registering imports nothing, and it builds no store.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import inspect
import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from lmcached.errors import ConfigError
from lmcached.extensions.registry import PluginError, PluginRegistry, get_registry

if TYPE_CHECKING:  # pragma: no cover
    from lmcached.config import Config

log = structlog.get_logger("lmcached.plugins")

ENTRY_POINT_GROUP = "lmcached.plugins"
GENERAL_GROUP = "lmcached.general_plugins"
STAT_LOGGER_GROUP = "lmcached.stat_logger_plugins"
# vLLM-style groups whose entry point *is* the entry: group -> registry category.
ENTRY_GROUPS = {GENERAL_GROUP: "general", STAT_LOGGER_GROUP: "stat_logger"}
ALLOW_ENV = "LMCACHED_PLUGINS"
# Entries from a config file were written by the operator for this daemon: they beat packages.
CONFIG_PRIORITY = 100
CONFIG_PACKAGE = "config"


@dataclass
class LoadReport:
    """What one :func:`load` did: entry points loaded, skipped by the allow-list, failed."""

    pid: int
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def allowed_plugins(environ: Mapping[str, str] | None = None) -> set[str] | None:
    """Return the ``LMCACHED_PLUGINS`` allow-list, or None when unset (everything loads)."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOW_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.module.split(".")[0]


def _dist_version(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


def load_entry_point(registry: PluginRegistry, ep: importlib.metadata.EntryPoint) -> None:
    """Register what one entry point provides: a manifest or a register function's entries."""
    package = _dist_name(ep)
    registry.note_package(package, version=_dist_version(ep), entry_point=ep.value)
    attr = ep.attr or ""
    if attr.endswith((".yaml", ".yml")):
        # AIPerf's form: the value names a YAML file shipped inside the package.
        resource = importlib.resources.files(ep.module).joinpath(attr)
        registry.load_manifest(
            _read_resource(resource), package=package, builtin=False, source=f"{ep.module}:{attr}"
        )
        registry.note_manifest(package, f"{ep.module}:{attr}")
        return
    fn = ep.load()
    if not callable(fn):
        raise PluginError("entry_point", ep.name, f"{ep.value} is neither a manifest nor callable")
    # vLLM's register functions take no argument; ours may take the registry.
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    with registry.default_package(package):
        if params:
            fn(registry)
        else:
            fn()
    registry.note_manifest(package, ep.value)


def _read_resource(resource: Any) -> Mapping[str, Any]:
    import yaml

    data = yaml.safe_load(resource.read_text())
    if not isinstance(data, Mapping):
        raise PluginError("manifest", str(resource), "expected a mapping of categories")
    return data


def register_group_entry(
    registry: PluginRegistry, ep: importlib.metadata.EntryPoint, category: str
) -> None:
    """Register one entry point of a vLLM-style group as an entry of ``category`` (no import)."""
    package = _dist_name(ep)
    registry.note_package(package, version=_dist_version(ep), entry_point=ep.value)
    registry.register(
        category,
        ep.name,
        ep.value,
        package=package,
        source=f"entry point {ep.group}",
    )
    registry.note_manifest(package, ep.value)


def load_entry_points(
    registry: PluginRegistry, *, environ: Mapping[str, str] | None = None
) -> LoadReport:
    """Register every allowed entry point of lmcached's groups; report each."""
    report = LoadReport(pid=os.getpid())
    allow = allowed_plugins(environ)
    seen: set[tuple[str, str, str]] = set()
    groups = [ENTRY_POINT_GROUP, *ENTRY_GROUPS]
    for group in groups:
        for ep in importlib.metadata.entry_points(group=group):
            _load_one(registry, ep, group, allow, seen, report)
    return report


def _load_one(
    registry: PluginRegistry,
    ep: importlib.metadata.EntryPoint,
    group: str,
    allow: set[str] | None,
    seen: set[tuple[str, str, str]],
    report: LoadReport,
) -> None:
    package = _dist_name(ep)
    if (group, ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
        return
    seen.add((group, ep.name, ep.value))
    if allow is not None and ep.name not in allow and package not in allow:
        report.skipped.append(ep.name)
        return
    try:
        if group in ENTRY_GROUPS:
            register_group_entry(registry, ep, ENTRY_GROUPS[group])
        else:
            load_entry_point(registry, ep)
    except Exception as exc:  # a broken package must not take the others down
        report.failed[ep.name] = f"{type(exc).__name__}: {exc}"
        log.error("cannot load plugin package", plugin=ep.name, value=ep.value, error=str(exc))
        return
    report.loaded.append(ep.name)


_LOAD_LOCK = threading.Lock()
# registry -> (pid, report). Weak: a registry replaced by reset_registry() takes its entry along.
_LOADED: weakref.WeakKeyDictionary[PluginRegistry, tuple[int, LoadReport]] = (
    weakref.WeakKeyDictionary()
)


def load(
    registry: PluginRegistry | None = None, *, environ: Mapping[str, str] | None = None
) -> LoadReport:
    """Load external plugins into ``registry`` once per process; return the report.

    Idempotent: a second call in the same process returns the first report. After ``fork``
    the child's pid differs, so it loads its own (vLLM's rule: every process loads, once).
    """
    registry = registry or get_registry()
    with _LOAD_LOCK:
        done = _LOADED.get(registry)
        if done is not None and done[0] == os.getpid():
            return done[1]
        report = load_entry_points(registry, environ=environ)
        _LOADED[registry] = (os.getpid(), report)
        registry.load_report = report
        return report


# ------------------------------------------------------------------------------------------
# LMCache-style config
# ------------------------------------------------------------------------------------------

_EXTRA_KEY = re.compile(
    r"^(?P<prefix>external_backend|storage_plugin|external_connector)\.(?P<name>[^.]+)\."
    r"(?P<option>.+)$"
)
DEPRECATED_PREFIX = {"storage_plugin": "external_backend"}


@dataclass(frozen=True)
class ExternalSpec:
    """One backend or connector declared in ``extra_config``."""

    kind: str  # "external_backend" or "external_connector"
    name: str  # backend name, or URL scheme for a connector
    module_path: str
    class_name: str
    options: Mapping[str, Any]
    key_prefix: str  # e.g. "external_backend.mem", for messages
    order: int = 0

    @property
    def class_path(self) -> str:
        return f"{self.module_path}:{self.class_name}"

    @property
    def category(self) -> str:
        return "storage_backend" if self.kind == "external_backend" else "remote_connector"


@dataclass
class ConfigPlugins:
    """The external backends (in lookup order) and connectors a config declares."""

    backends: list[ExternalSpec] = field(default_factory=list)
    connectors: dict[str, ExternalSpec] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # deprecation notes, for logs and `check`


def parse_config_plugins(cfg: Config) -> ConfigPlugins:
    """Read ``external_backends`` / ``storage_plugins`` and ``extra_config``; no import.

    Raises ConfigError naming the key for a listed backend without its module_path or
    class_name, a malformed value, or both spellings of the list set at once.
    """
    src = cfg.source
    out = ConfigPlugins()
    listed = list(cfg.external_backends)
    if cfg.storage_plugins:
        if listed:
            raise ConfigError(
                "storage_plugins",
                "is the deprecated spelling of external_backends, which is also set; keep one",
                src,
            )
        listed = list(cfg.storage_plugins)
        out.notes.append(
            "storage_plugins is deprecated (LMCache's newer spelling); use external_backends"
        )
    declared: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in cfg.extra_config.items():
        m = _EXTRA_KEY.match(key)
        if m is None:
            continue
        prefix = m["prefix"]
        kind = DEPRECATED_PREFIX.get(prefix, prefix)
        if prefix in DEPRECATED_PREFIX:
            note = f"extra_config {prefix}.* is deprecated; use {kind}.<name>.*"
            if note not in out.notes:
                out.notes.append(note)
        opts = declared.setdefault((kind, m["name"]), {})
        if m["option"] in opts:
            raise ConfigError(f"extra_config.{key}", "is set twice (old and new spelling)", src)
        opts[m["option"]] = value
    if len(set(listed)) != len(listed):
        raise ConfigError("external_backends", f"lists a name twice: {listed}", src)
    for order, name in enumerate(listed):
        backend_opts = declared.get(("external_backend", name))
        out.backends.append(_spec("external_backend", name, backend_opts, order, src))
    for (kind, name), opts in declared.items():
        if kind == "external_connector":
            spec = _spec(kind, name.lower(), opts, 0, src)
            out.connectors[spec.name] = spec
    return out


def _spec(
    kind: str, name: str, opts: dict[str, Any] | None, order: int, src: str | None
) -> ExternalSpec:
    prefix = f"{kind}.{name}"
    opts = dict(opts or {})
    for required in ("module_path", "class_name"):
        value = opts.pop(required, None)
        if not isinstance(value, str) or not value:
            what = "lists" if kind == "external_backend" else "declares"
            raise ConfigError(
                f"extra_config.{prefix}.{required}",
                f"external_backends {what} '{name}' but this key is missing or not a string"
                if kind == "external_backend"
                else "is missing or not a string",
                src,
            )
        opts[f"_{required}"] = value
    module_path = opts.pop("_module_path")
    class_name = opts.pop("_class_name")
    return ExternalSpec(kind, name, module_path, class_name, opts, prefix, order)


def register_config_plugins(plugins: ConfigPlugins, registry: PluginRegistry | None = None) -> None:
    """Register the config's backends and connectors at priority ``CONFIG_PRIORITY``.

    Replaces whatever an earlier config registered, so the entries always match this config.
    """
    registry = registry or get_registry()
    registry.remove_package(CONFIG_PACKAGE)
    for spec in [*plugins.backends, *plugins.connectors.values()]:
        try:
            registry.register(
                spec.category,
                spec.name,
                spec.class_path,
                priority=CONFIG_PRIORITY,
                description=f"declared in extra_config ({spec.key_prefix}.*)",
                metadata={"order": spec.order} if spec.kind == "external_backend" else {},
                package=CONFIG_PACKAGE,
                builtin=False,
                source=f"extra_config {spec.key_prefix}",
            )
        except PluginError as exc:
            raise ConfigError(f"extra_config.{spec.key_prefix}", str(exc)) from None


def as_dict(plugins: ConfigPlugins) -> dict[str, Any]:
    """Return the parsed declarations as plain data (for ``config show`` and tests)."""
    return {
        "backends": [dataclasses.asdict(s) for s in plugins.backends],
        "connectors": {k: dataclasses.asdict(s) for k, s in plugins.connectors.items()},
        "notes": list(plugins.notes),
    }
