"""The one registry of in-process extensions: storage backends, remote connectors, codecs,
policies, general plugins and stat loggers.

An entry is a name, a class path ``module:Class``, a priority, a description and metadata. The
class is imported only when someone asks for it (:meth:`PluginRegistry.get_class`), and then
checked against its category's interface, so a broken entry is reported by name instead of
surfacing as an AttributeError in the hot path. The daemon asks, at start, for every entry its
config uses (see :func:`lmcached.daemon.assembly.check_store_config`).

Conflicts between entries of the same name resolve as AIPerf's registry does:

1. the higher ``priority`` wins;
2. at equal priority an external package beats a built-in;
3. otherwise the first registered wins, with a warning.

A shadowed entry stays reachable by its full class path (``get_class(cat, "pkg.mod:Cls")``).

Built-ins are registered from ``builtin.yaml`` beside this module, through the same code path as
any external manifest, so nothing is special-cased.

Most categories hold classes. ``general`` holds callables (vLLM's general plugins: a function run
once in every daemon process at start), so its entries are checked for being callable instead
of against an interface.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from lmcached.errors import LMCachedError

__all__ = [
    "BUILTIN_MANIFEST",
    "BUILTIN_PACKAGE",
    "CATEGORIES",
    "Category",
    "PluginConflictWarning",
    "PluginEntry",
    "PluginError",
    "PluginIssue",
    "PluginNotFoundError",
    "PluginRegistry",
    "PluginValidationError",
    "check_interface",
    "find_registered_name",
    "get_registry",
    "import_class_path",
    "register",
    "reset_registry",
]

BUILTIN_PACKAGE = "lmcached"
BUILTIN_MANIFEST = Path(__file__).with_name("builtin.yaml")
MANIFEST_SCHEMA_VERSIONS = ("1.0",)

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CLASS_PATH_RE = re.compile(rf"^{_DOTTED}:{_DOTTED}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]*$")
# RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), compared case-insensitively.
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")


class PluginError(LMCachedError):
    """Root of registry errors; names the category and entry concerned."""

    def __init__(self, category: str, name: str, message: str) -> None:
        self.category = category
        self.name = name
        super().__init__(f"{category}:{name}: {message}")


class PluginNotFoundError(PluginError):
    """No entry of that name (or class path) is registered in the category."""


class PluginValidationError(PluginError):
    """An entry cannot be imported or does not implement its category's interface."""


class PluginConflictWarning(UserWarning):
    """Two entries of the same name and priority from the same kind of source; first one wins."""


@dataclass(frozen=True)
class Category:
    """A kind of extension: its interface and what its entries are keyed by."""

    name: str
    interface: str  # class path of the ABC every entry must implement
    description: str
    keyed_by: str = "name"
    plugin_type: str = "OTHER"  # KV-OptKit's plugin types: KV_CACHE, QUANTIZATION, OTHER
    # "class": entries are classes checked against ``interface``; "callable": entries are
    # functions (or any callable object), and ``interface`` only describes the call.
    kind: str = "class"


CATEGORIES: Mapping[str, Category] = MappingProxyType(
    {
        "storage_backend": Category(
            "storage_backend",
            "lmcached.storage.base:StorageBackend",
            "Tiers of the TieredStore; external ones join after the built-ins, in listed order.",
            plugin_type="KV_CACHE",
        ),
        "remote_connector": Category(
            "remote_connector",
            "lmcached.extensions.interfaces:RemoteConnector",
            "Byte stores behind the remote tier, chosen by the scheme of remote_url.",
            keyed_by="URL scheme",
            plugin_type="KV_CACHE",
        ),
        "codec": Category(
            "codec",
            "lmcached.codecs.base:Codec",
            "Block payload encodings (compression, quantisation), named in each block's header.",
            plugin_type="QUANTIZATION",
        ),
        "eviction_policy": Category(
            "eviction_policy",
            "lmcached.storage.eviction:EvictionPolicy",
            "Strategies that pick the next block to evict from a tier.",
        ),
        "general": Category(
            "general",
            "a callable taking no argument (or a ProcessInfo)",
            "Functions run once in every daemon process (scheduler and each worker) at start.",
            kind="callable",
        ),
        "stat_logger": Category(
            "stat_logger",
            "lmcached.extensions.stat_logger:StatLogger",
            "Classes the scheduler hands its stats snapshot every stat_logger_interval seconds.",
        ),
    }
)


@dataclass(frozen=True)
class PluginEntry:
    """One registered implementation. Registering never imports ``class_path``."""

    category: str
    name: str
    class_path: str
    priority: int = 0
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    package: str = BUILTIN_PACKAGE
    builtin: bool = True
    source: str = ""  # the manifest, entry point or config key that registered it
    seq: int = 0  # registration order, for "first registered wins"

    @property
    def module(self) -> str:
        return self.class_path.partition(":")[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "name": self.name,
            "class": self.class_path,
            "priority": self.priority,
            "description": self.description,
            "metadata": dict(self.metadata),
            "package": self.package,
            "builtin": self.builtin,
            "source": self.source,
        }


@dataclass(frozen=True)
class PluginIssue:
    """One problem found by :meth:`PluginRegistry.validate`."""

    category: str
    name: str
    class_path: str
    package: str
    error: str

    def __str__(self) -> str:
        return f"{self.category}:{self.name} ({self.class_path}, from {self.package}): {self.error}"


def import_class_path(class_path: str) -> Any:
    """Import ``module:Qual.Name`` and return the object; raise ImportError/AttributeError."""
    if not _CLASS_PATH_RE.match(class_path):
        raise ValueError(f"class path {class_path!r} is not of the form 'package.module:Class'")
    module_name, _, qualname = class_path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {qualname!r}") from None
    return obj


def required_methods(interface: type) -> list[str]:
    """Return the names an implementation must provide: the interface's abstract methods."""
    return sorted(getattr(interface, "__abstractmethods__", ()))


def check_interface(cls: Any, interface: type) -> str | None:
    """Return why ``cls`` does not implement ``interface``, or None when it does.

    A subclass must leave no abstract method unimplemented. A class that does not subclass the
    interface (an LMCache backend written against LMCache's own base, say) is accepted when it
    provides every required method, checked structurally.
    """
    if not inspect.isclass(cls):
        return f"{cls!r} is not a class"
    if issubclass(cls, interface):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
    else:
        missing = [m for m in required_methods(interface) if not callable(getattr(cls, m, None))]
    if missing:
        return (
            f"{cls.__qualname__} does not implement {interface.__qualname__}: "
            f"missing {', '.join(missing)}"
        )
    return None


class PluginRegistry:
    """Hold every entry by category and name; import classes lazily and check them."""

    def __init__(self, *, load_builtins: bool = True) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, list[PluginEntry]]] = {c: {} for c in CATEGORIES}
        self._classes: dict[str, Any] = {}  # class path -> checked class (or callable)
        self._manifests: list[tuple[str, str]] = []  # (package, source)
        self._packages: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._default_package: contextvars.ContextVar[str] = contextvars.ContextVar(
            "package", default="runtime"
        )
        self.load_report: Any = None  # set by sources.load()
        if load_builtins:
            self.load_manifest(BUILTIN_MANIFEST, package=BUILTIN_PACKAGE, builtin=True)

    # ---------------------------------------------------------------------------------------
    # Registration
    # ---------------------------------------------------------------------------------------

    def register(
        self,
        category: str,
        name: str,
        class_path: str | type | Callable[[], Any],
        *,
        priority: int = 0,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        package: str | None = None,
        builtin: bool = False,
        source: str = "register()",
    ) -> PluginEntry:
        """Register one entry and return it; raise PluginError on a malformed name or path.

        ``class_path`` may be a class object (handy for tests and register functions), or for
        ``general`` a function; it is then recorded by its import path and cached without a
        second import.
        """
        cat = self._category(category, name)
        name = self._check_name(cat, name)
        if package is None:
            # Inside an entry point's register function: credit its distribution.
            package = self._default_package.get()
        cls_obj: Any = None
        if inspect.isclass(class_path) or (cat.kind == "callable" and callable(class_path)):
            cls_obj = class_path
            class_path = f"{class_path.__module__}:{class_path.__qualname__}"
        if not isinstance(class_path, str) or not _CLASS_PATH_RE.match(class_path):
            raise PluginError(
                category, name, f"class {class_path!r} is not of the form 'package.module:Class'"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise PluginError(category, name, f"priority must be an integer, got {priority!r}")
        with self._lock:
            self._seq += 1
            entry = PluginEntry(
                category=category,
                name=name,
                class_path=class_path,
                priority=priority,
                description=description.strip(),
                metadata=MappingProxyType(dict(metadata or {})),
                package=package,
                builtin=builtin,
                source=source,
                seq=self._seq,
            )
            rivals = self._entries[category].setdefault(name, [])
            for rival in rivals:
                if rival.class_path == class_path and rival.package == package:
                    # The same manifest loaded twice (idempotent loading); keep the first.
                    return rival
            for rival in rivals:
                if rival.priority == priority and rival.builtin == builtin:
                    warnings.warn(
                        f"{category}:{name}: {class_path} (from {package}) and {rival.class_path} "
                        f"(from {rival.package}) have the same priority {priority}; the first "
                        f"registered, {rival.class_path}, wins. Raise one's priority to choose.",
                        PluginConflictWarning,
                        stacklevel=2,
                    )
            rivals.append(entry)
            if cls_obj is not None:
                self._classes.setdefault(class_path, cls_obj)
            return entry

    def load_manifest(
        self,
        manifest: str | Path | Mapping[str, Any],
        *,
        package: str,
        builtin: bool = False,
        source: str | None = None,
    ) -> list[PluginEntry]:
        """Register every entry of a YAML manifest (a path or a parsed mapping); return them.

        Manifest format (AIPerf's ``plugins.yaml``)::

            schema_version: "1.0"
            codec:
              brotli:
                class: my_pkg.codecs:BrotliCodec
                description: Brotli compression.
                priority: 0
                metadata: {lossless: true}
        """
        if isinstance(manifest, Mapping):
            data: Any = manifest
            where = source or f"<{package} manifest>"
        else:
            path = Path(manifest)
            where = source or str(path)
            try:
                data = yaml.safe_load(path.read_text())
            except OSError as exc:
                raise PluginError("manifest", where, f"cannot read: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                msg = str(exc).replace("\n", " ")
                raise PluginError("manifest", where, f"not valid YAML: {msg}") from None
        if not isinstance(data, Mapping):
            raise PluginError("manifest", where, "expected a mapping of categories")
        version = str(data.get("schema_version", "1.0"))
        if version not in MANIFEST_SCHEMA_VERSIONS:
            raise PluginError(
                "manifest",
                where,
                f"schema_version {version!r} is not supported "
                f"(supported: {', '.join(MANIFEST_SCHEMA_VERSIONS)})",
            )
        out = []
        for category, entries in data.items():
            if category in ("schema_version", "package"):
                continue
            if category not in CATEGORIES:
                raise PluginError(
                    "manifest", where, f"unknown category {category!r}; known: {_known(CATEGORIES)}"
                )
            if not isinstance(entries, Mapping):
                raise PluginError(category, where, "expected a mapping of entry names")
            for name, spec in entries.items():
                if isinstance(spec, str):
                    spec = {"class": spec}
                if not isinstance(spec, Mapping) or "class" not in spec:
                    raise PluginError(category, str(name), f"{where}: each entry needs a 'class'")
                unknown = set(spec) - {"class", "description", "priority", "metadata"}
                if unknown:
                    raise PluginError(
                        category, str(name), f"{where}: unknown fields {sorted(unknown)}"
                    )
                out.append(
                    self.register(
                        category,
                        str(name),
                        spec["class"],
                        priority=spec.get("priority", 0),
                        description=str(spec.get("description", "")),
                        metadata=spec.get("metadata") or {},
                        package=package,
                        builtin=builtin,
                        source=where,
                    )
                )
        self.note_manifest(package, where)
        return out

    def note_manifest(self, package: str, source: str) -> None:
        """Record that ``package`` contributed entries through ``source``."""
        with self._lock:
            if (package, source) not in self._manifests:
                self._manifests.append((package, source))

    @contextlib.contextmanager
    def default_package(self, package: str) -> Iterator[None]:
        """Credit entries registered without a package to ``package`` (entry-point loading)."""
        token = self._default_package.set(package)
        try:
            yield
        finally:
            self._default_package.reset(token)

    def remove_package(self, package: str) -> int:
        """Forget every entry that ``package`` registered; return how many.

        The config's LMCache-style declarations are re-registered on each load under the
        package ``config``, so a reloaded or different config never resolves to a stale class.
        """
        removed = 0
        with self._lock:
            for names in self._entries.values():
                for name in list(names):
                    kept = [e for e in names[name] if e.package != package]
                    removed += len(names[name]) - len(kept)
                    if kept:
                        names[name] = kept
                    else:
                        del names[name]
        return removed

    def note_package(self, name: str, **info: Any) -> None:
        """Record a package that contributed entries (shown by ``lmcached plugins --packages``)."""
        with self._lock:
            self._packages.setdefault(name, {}).update(info)

    # ---------------------------------------------------------------------------------------
    # Lookup
    # ---------------------------------------------------------------------------------------

    def get_entry(self, category: str, name: str) -> PluginEntry:
        """Return the winning entry for ``name``, or the entry with that full class path."""
        cat = self._category(category, name)
        with self._lock:
            if ":" in name:
                for named in self._entries[category].values():
                    for entry in named:
                        if entry.class_path == name:
                            return entry
                raise PluginNotFoundError(category, name, "no entry has this class path")
            key = name.lower() if cat.keyed_by == "URL scheme" else name
            rivals = self._entries[category].get(key)
            if not rivals:
                known = ", ".join(sorted(self._entries[category])) or "none"
                raise PluginNotFoundError(category, name, f"not registered; known: {known}")
            return _winner(rivals)

    def shadowed(self, category: str, name: str) -> list[PluginEntry]:
        """Return the entries that lost the conflict for ``name``, best first."""
        cat = self._category(category, name)
        if cat.keyed_by == "URL scheme":
            name = name.lower()
        with self._lock:
            rivals = list(self._entries[category].get(name, []))
        if not rivals:
            return []
        winner = _winner(rivals)
        return sorted((e for e in rivals if e is not winner), key=_rank, reverse=True)

    def has(self, category: str, name: str) -> bool:
        try:
            self.get_entry(category, name)
        except PluginNotFoundError:
            return False
        return True

    def names(self, category: str) -> list[str]:
        self._category(category, "")
        with self._lock:
            return sorted(self._entries[category])

    def _rival_groups(self, category: str | None) -> Iterator[list[PluginEntry]]:
        """Yield, by category then name, the entries that compete for each name."""
        for cat in [category] if category else list(CATEGORIES):
            self._category(cat, "")
            with self._lock:
                groups = [list(v) for _, v in sorted(self._entries[cat].items())]
            yield from groups

    def iter_entries(self, category: str | None = None) -> Iterator[PluginEntry]:
        """Yield the winning entry of every name, by category then name."""
        for rivals in self._rival_groups(category):
            yield _winner(rivals)

    def iter_all_entries(self, category: str | None = None) -> Iterator[PluginEntry]:
        """Yield every entry, shadowed ones included."""
        for rivals in self._rival_groups(category):
            yield from sorted(rivals, key=_rank, reverse=True)

    def get_class(self, category: str, name: str) -> type:
        """Import (once) and return the class for ``name``, checked against the interface.

        ``name`` may be a registered name, or a full class path ``module:Class``: a shadowed
        entry's path, or any importable class (an explicit path in a config file). In the
        ``general`` category the object is a callable (see :meth:`get_callable`).
        """
        loaded: type = self._load(category, name)
        return loaded

    def get_callable(self, category: str, name: str) -> Callable[[], Any]:
        """Import (once) and return the callable of a ``general`` entry, checked callable."""
        if self._category(category, name).kind != "callable":
            raise PluginError(category, name, "entries of this category are classes")
        loaded: Callable[[], Any] = self._load(category, name)
        return loaded

    def _load(self, category: str, name: str) -> Any:
        self._category(category, name)
        if ":" in name:
            try:
                class_path = self.get_entry(category, name).class_path
            except PluginNotFoundError:
                class_path = name
        else:
            class_path = self.get_entry(category, name).class_path
        with self._lock:
            cached = self._classes.get(class_path)
        if cached is None:
            try:
                cached = import_class_path(class_path)
            except Exception as exc:  # ImportError, AttributeError, errors raised at import
                raise PluginValidationError(
                    category, name, f"cannot import {class_path}: {type(exc).__name__}: {exc}"
                ) from exc
        if CATEGORIES[category].kind == "callable":
            problem = None if callable(cached) else f"{cached!r} is not callable"
        else:
            problem = check_interface(cached, self.interface(category))
        if problem is not None:
            raise PluginValidationError(category, name, f"{class_path}: {problem}")
        with self._lock:
            self._classes[class_path] = cached
        return cached

    def interface(self, category: str) -> type:
        """Return the interface class of a category (imports the interface's module)."""
        cat = self._category(category, "")
        if cat.kind != "class":
            raise TypeError(f"{category} entries are {cat.interface}, not classes")
        iface = import_class_path(cat.interface)
        if not inspect.isclass(iface):  # pragma: no cover - a bug in CATEGORIES
            raise TypeError(f"interface of {category} is not a class: {cat.interface}")
        return iface

    def find_registered_name(self, category: str, cls: Any) -> str | None:
        """Return the name under which ``cls`` (a class or function) wins, or None."""
        path = f"{cls.__module__}:{cls.__qualname__}"
        for entry in self.iter_entries(category):
            if entry.class_path == path:
                return entry.name
        return None

    def packages(self) -> list[dict[str, Any]]:
        """Return each contributing package: name, version, entry count, manifests."""
        counts: dict[str, int] = {}
        for entry in self.iter_all_entries():
            counts[entry.package] = counts.get(entry.package, 0) + 1
        with self._lock:
            names = set(counts) | set(self._packages)
            out = []
            for pkg in sorted(names, key=lambda p: (p != BUILTIN_PACKAGE, p)):
                info = dict(self._packages.get(pkg, {}))
                out.append(
                    {
                        "package": pkg,
                        "version": info.pop("version", None),
                        "entries": counts.get(pkg, 0),
                        "sources": sorted({s for p, s in self._manifests if p == pkg}),
                        **info,
                    }
                )
        return out

    # ---------------------------------------------------------------------------------------
    # Validation
    # ---------------------------------------------------------------------------------------

    def validate_entry(self, entry: PluginEntry, *, check_class: bool = True) -> str | None:
        """Return why ``entry`` is broken, or None.

        Without ``check_class`` only the module is located (``importlib.util.find_spec``: its
        parent packages are imported, the module itself is not). With it the class is
        imported and checked against the interface.
        """
        if not check_class:
            try:
                spec = importlib.util.find_spec(entry.module)
            except (ImportError, ValueError) as exc:
                return f"cannot locate module {entry.module}: {exc}"
            return None if spec is not None else f"module {entry.module} not found"
        try:
            self.get_class(entry.category, entry.class_path)
        except PluginError as exc:
            return str(exc).split(": ", 1)[1]
        return _missing_requirement(entry)

    def validate(
        self,
        category: str | None = None,
        name: str | None = None,
        *,
        check_class: bool = True,
    ) -> list[PluginIssue]:
        """Check every entry (shadowed ones too); return the problems found, none when healthy."""
        issues = []
        for entry in self.iter_all_entries(category):
            if name is not None and entry.name != name:
                continue
            error = self.validate_entry(entry, check_class=check_class)
            if error is not None:
                issues.append(
                    PluginIssue(entry.category, entry.name, entry.class_path, entry.package, error)
                )
        return issues

    # ---------------------------------------------------------------------------------------

    def _category(self, category: str, name: str) -> Category:
        cat = CATEGORIES.get(category)
        if cat is None:
            raise PluginNotFoundError(
                category, name, f"unknown category; known: {_known(CATEGORIES)}"
            )
        return cat

    def _check_name(self, cat: Category, name: str) -> str:
        if cat.keyed_by == "URL scheme":
            name = name.lower()
            if not _SCHEME_RE.match(name):
                raise PluginError(cat.name, name, "connectors are named by URL scheme")
        elif not _NAME_RE.match(name):
            raise PluginError(
                cat.name, name, "names are lowercase letters, digits and _ . + - (no ':')"
            )
        return name


def _missing_requirement(entry: PluginEntry) -> str | None:
    """Import the modules named by the entry's ``requires`` metadata; say which one fails.

    A class may import its library only when it is built (the codecs do, so a daemon without
    lz4 can still use zstd): importing the class alone does not prove the entry usable.
    """
    required = entry.metadata.get("requires") or []
    for module in [required] if isinstance(required, str) else required:
        try:
            importlib.import_module(str(module))
        except Exception as exc:  # an entry's library may fail in any way on import
            return f"needs module {module!r}, which cannot be imported: {exc}"
    return None


def _rank(entry: PluginEntry) -> tuple[int, int, int]:
    # Higher priority, then external over built-in, then earlier registration.
    return (entry.priority, 0 if entry.builtin else 1, -entry.seq)


def _winner(rivals: list[PluginEntry]) -> PluginEntry:
    return max(rivals, key=_rank)


def _known(mapping: Mapping[str, Any]) -> str:
    return ", ".join(sorted(mapping))


_REGISTRY: PluginRegistry | None = None
_REGISTRY_LOCK = threading.Lock()


def get_registry() -> PluginRegistry:
    """Return this process's registry, built-ins loaded (external sources: ``sources.load``)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = PluginRegistry()
        return _REGISTRY


def reset_registry() -> PluginRegistry:
    """Replace this process's registry with a fresh one holding only the built-ins (tests)."""
    global _REGISTRY
    # What other modules remember about a registry (the entry points loaded into it, the
    # codecs built from it) is keyed by the registry object, so it goes with the old one.
    with _REGISTRY_LOCK:
        _REGISTRY = PluginRegistry()
        return _REGISTRY


def register(
    category: str,
    name: str,
    class_path: str | type | Callable[[], Any],
    *,
    priority: int = 0,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> PluginEntry:
    """Register an entry in this process's registry (for vLLM-style no-argument register())."""
    return get_registry().register(
        category, name, class_path, priority=priority, description=description, metadata=metadata
    )


def find_registered_name(category: str, cls: Any) -> str | None:
    """Return the name under which ``cls`` wins in this process's registry (reverse lookup)."""
    return get_registry().find_registered_name(category, cls)
