"""``LMCachedConnector``: a vLLM KV connector (``KVConnectorBase_V1``) backed by lmcached.

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "LMCachedConnector",
                           "kv_connector_module_path": "lmcached.integrations.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"lmcached.config": "/etc/lmcached/lmcached.yaml"}}'

How it works:

* **Keys** come from :class:`lmcached.keys.KeyBuilder` over the request's prompt token ids, never
  from vLLM's block hashes (those may be seeded per process, which loses every hit across engine
  restarts). The key's model part is the served model with a weights revision (given, or a
  fingerprint of the local checkpoint); its layout part holds the KV dtype, block size, the
  per-layer KV shapes, the device type and the TP/PP rank; the chained hash mixes in the
  request's ``cache_salt``, LoRA adapter and multimodal hashes. So different models, layouts,
  salts or adapters never share KV.
* **Settings** are the ``lmcached.*`` keys of ``kv_connector_extra_config``. LMCache's
  ``lmcache.*`` keys map to them where there is an equivalent, and LMCache's connector-feature
  keys (``save_unfull_chunk``, ``use_layerwise``, ``enable_async_loading``) are also read from
  ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_<KEY>``, as LMCache's connector reads them
  (:func:`read_settings`); the others are named in one warning each.
* **Scheduler side** (:meth:`get_num_new_matched_tokens`): one batched ``lookup`` per request
  (remembered, so repeated calls are free) gives the leading hit, to the token (whole chunks,
  then a partial chunk a prompt stored); vLLM loads it, less the last token of a fully cached
  prompt, which must be computed. If the daemon is down the hit is 0 and a rate-limited warning
  is logged; the engine never sees an exception and never waits on a dead daemon more than once
  per ``lmcached.retry_interval``.
* **Worker side**: :meth:`start_load_kv` fetches the hit chunks in one batched ``get`` and
  copies them into the request's blocks layer by layer while the forward pass runs
  (``lmcached.load_mode: layerwise``, the ``auto`` default on a GPU; ``wait_for_layer_load``
  waits for one layer's KV), or all before it (``sync``, the ``auto`` default on a CPU). A chunk whose size is not exactly what this engine's layout needs is not
  loaded. A chunk that cannot be loaded (missing, failed checksum in the daemon, timeout, daemon
  down) is reported through :meth:`get_block_ids_with_load_errors` from its first block on, and
  vLLM recomputes those tokens (this needs ``"kv_load_failure_policy": "recompute"``; with
  vLLM's default ``fail`` such a request fails instead).
  :meth:`wait_for_save` gathers the chunks that became complete in this step (prompt tokens
  only, and a prompt's trailing partial chunk unless ``lmcached.save_partial_chunks`` is false)
  into host buffers and hands them to a saver thread, which skips chunks the daemon already has
  and puts the rest; the network time overlaps the next forward pass. It never waits for
  earlier saves: past a backlog limit, a save is skipped instead.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from lmcached import config_lmcache
from lmcached.integrations.daemon_link import DaemonLink
from lmcached.integrations.kv_blocks import (
    HostBufferPool,
    HostRegistrations,
    PagedKV,
    layer_order,
    payload_tensor,
)
from lmcached.integrations.layer_loads import CudaOrder, DeviceOrder, HostOrder, LayerLoads
from lmcached.runtime import default_control_endpoint

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from lmcached.keys import KeyBuilder

logger = init_logger(__name__)

# Same-host engines use the daemon's ipc control socket; TCP is off unless enabled (with CURVE).
DEFAULT_ENDPOINT = default_control_endpoint()
DEFAULT_CHUNK_SIZE = 256


# --------------------------------------------------------------------------------------------
# Settings: the "lmcached.*" keys of kv_connector_extra_config.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's settings, read from ``kv_connector_extra_config``."""

    endpoint: str | None = None
    config: str | None = None
    chunk_size: int | None = None
    namespace: str = "vllm"
    revision: str | None = None
    timeout: float = 5.0
    lookup_timeout: float = 1.0
    retry_interval: float = 5.0
    save: bool = True
    load: bool = True
    load_mode: str = "auto"
    save_partial_chunks: bool = True


# key -> (field, converter, documentation). README's table is generated from the same text.
SETTINGS_DOC: dict[str, tuple[str, Any, str]] = {
    "lmcached.endpoint": (
        "endpoint",
        str,
        "Daemon control endpoint, e.g. ipc:///run/lmcached/default/control.sock, or "
        "tcp://host:7470 with enable_tcp. Default: $LMCACHED_CONTROL_ENDPOINT, else the ipc "
        "control socket of a daemon started without --config (<runtime_dir>/default/control.sock).",
    ),
    "lmcached.config": (
        "config",
        str,
        "Path of the daemon's config file; the endpoint is read from it (instead of "
        "lmcached.endpoint).",
    ),
    "lmcached.chunk_size": (
        "chunk_size",
        int,
        "Tokens per stored chunk. Default: the daemon map's chunk_size (or "
        f"{DEFAULT_CHUNK_SIZE} if the daemon is down at start). Must be a multiple of vLLM's "
        "block_size. Every engine sharing KV must use the same value.",
    ),
    "lmcached.namespace": (
        "namespace",
        str,
        "First part of every key; `lmcached purge <namespace>/` drops them all. Default: vllm.",
    ),
    "lmcached.revision": (
        "revision",
        str,
        "Weights revision in the keys. Default: vLLM's --revision, else a fingerprint of the "
        "local checkpoint files, else 'unversioned'.",
    ),
    "lmcached.timeout": (
        "timeout",
        float,
        "Seconds allowed for one get or put batch (worker side). Default: 5.",
    ),
    "lmcached.lookup_timeout": (
        "lookup_timeout",
        float,
        "Seconds allowed for the scheduler's lookup of one request. Default: 1.",
    ),
    "lmcached.retry_interval": (
        "retry_interval",
        float,
        "After a failed call, seconds during which the daemon is treated as down (0 hits, no "
        "saves, no waiting) before it is tried again. Default: 5.",
    ),
    "lmcached.save": ("save", bool, "Store newly computed chunks. Default: true."),
    "lmcached.save_partial_chunks": (
        "save_partial_chunks",
        bool,
        "Also store a prompt's trailing partial chunk (fewer than chunk_size tokens), so a "
        "repeated prompt hits to the token. LMCache's save_unfull_chunk. Default: true.",
    ),
    "lmcached.load": ("load", bool, "Load hits from lmcached. Default: true."),
    "lmcached.load_mode": (
        "load_mode",
        str,
        "layerwise: copy loaded KV in layer by layer on a loader thread while the forward pass "
        "runs (each layer waits only for its own KV; on a GPU, a side stream ordered by CUDA "
        "events); sync: copy all of it before the forward pass; auto: layerwise when the KV "
        "cache is on a GPU, sync on a CPU, where a hit computes one token and the loader "
        "thread's hand-off only costs (measured: sync 1.2-1.7x faster). Default: auto.",
    ),
}

LOAD_MODES = ("auto", "layerwise", "sync")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def parse_settings(extra: dict[str, Any] | None) -> ConnectorSettings:
    """Read the ``lmcached.*`` keys; raise ValueError naming any bad or unknown key."""
    values: dict[str, Any] = {}
    for key, raw in (extra or {}).items():
        if not key.startswith("lmcached."):
            continue  # keys of other connectors (MultiConnector) are theirs
        if key not in SETTINGS_DOC:
            near = difflib.get_close_matches(key, list(SETTINGS_DOC), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"kv_connector_extra_config: unknown key {key!r}{hint} "
                f"(known: {', '.join(sorted(SETTINGS_DOC))})"
            )
        name, convert, _doc = SETTINGS_DOC[key]
        try:
            value = _to_bool(raw) if convert is bool else convert(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"kv_connector_extra_config: {key}={raw!r}: {exc}") from None
        if convert in (int, float) and value <= 0:
            raise ValueError(f"kv_connector_extra_config: {key}={raw!r}: must be positive")
        if name == "load_mode" and value not in LOAD_MODES:
            raise ValueError(
                f"kv_connector_extra_config: {key}={raw!r}: must be one of {', '.join(LOAD_MODES)}"
            )
        values[name] = value
    return ConnectorSettings(**values)


def read_settings(
    extra: dict[str, Any] | None, environ: Mapping[str, str] | None = None
) -> tuple[ConnectorSettings, list[str]]:
    """Return the settings and the warnings about LMCache keys, from every place they come from.

    Lowest precedence first, as LMCache's connector reads them: LMCache's file
    (``LMCACHE_CONFIG_FILE``) and ``LMCACHE_<KEY>`` for LMCache's connector-feature keys only,
    then ``lmcache.*`` keys, then ``lmcached.*`` keys of ``kv_connector_extra_config``.
    """
    extra = extra or {}
    inherited, warnings = config_lmcache.lmcache_connector_entries(
        os.environ if environ is None else environ
    )
    mapped, mapping_warnings = config_lmcache.map_lmcache_connector_keys(extra, inherited)
    warnings += mapping_warnings
    for key, value in list(mapped.items()):
        try:
            parse_settings({key: value})
        except ValueError as exc:
            # LMCache's connector took this value: an engine migrating with it still starts,
            # with our default and a warning.
            warnings.append(f"{exc} (mapped from an lmcache.* key): ignored")
            del mapped[key]
    return parse_settings({**mapped, **extra}), warnings


# Warnings already logged in this process: a process may build several connectors (tests, and
# vLLM's scheduler and worker roles when they share one process).
_logged_warnings: set[str] = set()


def log_settings_warnings(warnings: list[str]) -> None:
    """Log each warning once per process."""
    for warning in warnings:
        if warning not in _logged_warnings:
            _logged_warnings.add(warning)
            logger.warning("LMCachedConnector: %s", warning)


def make_client_factory(settings: ConnectorSettings, timeout: float) -> Any:
    """Return a function that builds a :class:`lmcached.client.Client` for these settings."""

    def make() -> Any:
        from lmcached.client import Client

        if settings.config:
            # Re-reads the daemon's endpoints file after a failure: follows a restarted daemon.
            return Client.from_config(settings.config, timeout=timeout)
        endpoint = (
            settings.endpoint or os.environ.get("LMCACHED_CONTROL_ENDPOINT") or DEFAULT_ENDPOINT
        )
        return Client(endpoint, timeout=timeout)

    return make


# --------------------------------------------------------------------------------------------
# Identity: what goes into a key besides the tokens.
# --------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def key_part(text: str, limit: int = 64) -> str:
    """Make ``text`` safe as one ``/``-free part of a key (long values keep a hash suffix)."""
    safe = _UNSAFE.sub("_", text).strip("_") or "_"
    if len(safe) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        safe = f"{safe[: limit - 13]}~{digest}"
    return safe


def checkpoint_fingerprint(path: str) -> str | None:
    """Fingerprint a local checkpoint: its config.json, and each weight file's size and ends.

    Reading the first and last MiB of each weight file (not all of it) keeps this fast for
    large models while still telling apart retrained or re-initialised weights.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return "fp-" + digest.hexdigest()[:16]


def model_identity(vllm_config: VllmConfig, settings: ConnectorSettings) -> tuple[str, str]:
    """Return the (model, revision) parts of the keys."""
    model_config = vllm_config.model_config
    model_name = str(model_config.model)
    revision = settings.revision or getattr(model_config, "revision", None)
    if not revision:
        revision = checkpoint_fingerprint(model_name) or "unversioned"
    # A local path names the model by its folder; its revision fingerprint tells copies apart.
    name = os.path.basename(model_name.rstrip("/")) if os.path.isdir(model_name) else model_name
    return key_part(name), key_part(str(revision))


def check_chunk_size(chunk_size: int, block_size: int, source: str) -> None:
    """Fail at start unless vLLM's block size divides the chunk size (chunks are whole blocks)."""
    if chunk_size % block_size != 0:
        raise ValueError(
            f"LMCachedConnector: {source} is {chunk_size}, which vLLM's block_size "
            f"{block_size} does not divide; set lmcached.chunk_size (and the daemon's "
            f"chunk_size) to a multiple of {block_size}, or change --block-size"
        )


_SUPPORTED_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")


def check_kv_cache_config(kv_cache_config: KVCacheConfig) -> None:
    """Refuse, at start, models whose KV cache this connector cannot store (hybrid models)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"LMCachedConnector supports models whose KV cache is one group of full-attention "
            f"layers; this model has {len(groups)} KV cache groups"
        )
    spec = groups[0].kv_cache_spec
    # Sliding-window and other partial specs free or reuse blocks inside a prefix, so a
    # chunk's blocks would not hold the whole chunk's KV.
    if type(spec).__name__ not in _SUPPORTED_SPECS or getattr(spec, "sliding_window", None):
        raise ValueError(
            f"LMCachedConnector supports full-attention KV caches; this model's is "
            f"{type(spec).__name__}"
        )


def layout_tag(vllm_config: VllmConfig, tp_rank: int, pp_rank: int) -> str:
    """Return the layout part of the keys for one rank: what makes its KV bytes what they are.

    Built only from the engine's configuration, so that the scheduler (which has no KV
    tensors), every worker, and any tool holding the same config compute the same tag.
    """
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    dtype = str(cache_config.cache_dtype)
    if dtype == "auto":
        dtype = str(model_config.dtype)
    dtype = dtype.replace("torch.", "")
    heads = model_config.get_num_kv_heads(parallel)
    head_size = model_config.get_head_size()
    layers = model_config.get_num_layers(parallel)
    # What else shapes the bytes goes into a short hash: the device (CPU and CUDA backends lay
    # blocks out differently), the architecture and any sliding window.
    detail = "|".join(
        [
            str(vllm_config.device_config.device_type),
            ",".join(getattr(model_config, "architectures", None) or []),
            str(model_config.get_sliding_window()),
        ]
    )
    short = hashlib.sha256(detail.encode()).hexdigest()[:8]
    return key_part(
        f"{dtype}.b{cache_config.block_size}.h{heads}x{head_size}.L{layers}.{short}"
        f".tp{tp_rank}of{parallel.tensor_parallel_size}.pp{pp_rank}of{parallel.pipeline_parallel_size}",
        limit=120,
    )


def key_builder(
    vllm_config: VllmConfig, chunk_size: int, tp_rank: int = 0, pp_rank: int = 0
) -> KeyBuilder:
    """Return the KeyBuilder that the connector of this engine and rank uses.

    Public so that tools (and tests) can find, purge or pre-warm exactly the connector's keys.
    """
    from lmcached.keys import KeyBuilder

    kv_transfer = vllm_config.kv_transfer_config
    settings, _warnings = read_settings(
        kv_transfer.kv_connector_extra_config if kv_transfer else None
    )
    model, revision = model_identity(vllm_config, settings)
    return KeyBuilder(
        namespace=settings.namespace,
        model=model,
        revision=revision,
        layout=layout_tag(vllm_config, tp_rank, pp_rank),
        chunk_size=chunk_size,
    )


def request_extra(request: Request) -> bytes:
    """Return what besides the tokens makes this request's prefix KV differ, for the key chain."""
    parts = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(b"salt=" + str(salt).encode())
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={lora.lora_name}:{lora.lora_int_id}:{lora.lora_path}".encode())
    mm = [str(f.identifier) for f in (getattr(request, "mm_features", None) or [])]
    if mm:
        parts.append(b"mm=" + ",".join(mm).encode())
    return b"\x00".join(parts)


# --------------------------------------------------------------------------------------------
# Metadata sent from the scheduler side to the worker side each step.
# --------------------------------------------------------------------------------------------


@dataclass
class LoadSpec:
    """Load chunks [first_chunk, first_chunk + len(chunk_blocks)) of a request.

    ``chunk_blocks[i]`` are the block ids of chunk ``first_chunk + i``; only blocks holding
    tokens in [start_token, end_token) are written.
    """

    req_id: str
    tokens: list[int]
    extra: bytes
    first_chunk: int
    chunk_blocks: list[list[int]]
    start_token: int
    end_token: int


@dataclass
class _LoadPiece:
    """One fetched chunk of a load, ready to copy into its blocks (worker side)."""

    payload: Any  # uint8 tensor viewing the received bytes
    received: Any  # what the get returned (a leased view of the arena, on the same host)
    blocks: list[int]  # the chunk's blocks, in order
    positions: list[int]  # which of them to write
    edge: int | None  # position of the block the load ends inside of (shared with the forward)
    load_blocks: list[int]  # the blocks written (reported if the load fails)


@dataclass
class SaveSpec:
    """Save chunks [first_chunk, first_chunk + len(chunk_blocks)) of a request."""

    req_id: str
    tokens: list[int]
    extra: bytes
    first_chunk: int
    chunk_blocks: list[list[int]]


@dataclass
class LMCachedConnectorMetadata(KVConnectorMetadata):
    """One engine step's loads and saves."""

    chunk_size: int
    block_size: int
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _RequestState:
    """What the scheduler side remembers about one request until it finishes."""

    tokens: list[int]
    extra: bytes
    hit_tokens: int  # leading tokens the daemon holds (whole chunks, then maybe a partial one)
    saved_chunks: int  # leading whole chunks the daemon holds or that were handed to a save
    partial_saved: bool = False  # the prompt's own trailing partial chunk is held or handed off
    asked_from: int = 0  # num_computed_tokens of the last get_num_new_matched_tokens
    pending_load: tuple[int, int] | None = None
    block_ids: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The connector.
# --------------------------------------------------------------------------------------------


class LMCachedConnector(KVConnectorBase_V1):
    """vLLM KV connector that loads and stores prefix KV in an lmcached daemon."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings, warnings = read_settings(extra)
        if role == KVConnectorRole.SCHEDULER:
            # Once per engine: the worker roles read the same keys.
            log_settings_warnings(warnings)
        self.block_size = vllm_config.cache_config.block_size
        self.model, self.revision = model_identity(vllm_config, self.settings)
        self.num_blocks = kv_cache_config.num_blocks
        parallel = vllm_config.parallel_config
        self.tp_size = parallel.tensor_parallel_size
        self.pp_size = parallel.pipeline_parallel_size
        self._key_builders: dict[tuple[int, int, int], KeyBuilder] = {}
        check_kv_cache_config(kv_cache_config)

        if role == KVConnectorRole.SCHEDULER:
            self._link = DaemonLink(
                make_client_factory(self.settings, self.settings.lookup_timeout),
                logger,
                timeout=self.settings.lookup_timeout,
                retry_interval=self.settings.retry_interval,
            )
            self.chunk_size = self._resolve_chunk_size()
            # Every rank's layout tag, to look a prefix up for all of them.
            self._ranks = [(t, p) for p in range(self.pp_size) for t in range(self.tp_size)]
            self._requests: dict[str, _RequestState] = {}
            logger.info(
                "LMCachedConnector (scheduler): model=%s revision=%s chunk_size=%d block_size=%d",
                self.model,
                self.revision,
                self.chunk_size,
                self.block_size,
            )
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            self.tp_rank = get_tp_group().rank_in_group
            self.pp_rank = get_pp_group().rank_in_group
            self.layout = layout_tag(vllm_config, self.tp_rank, self.pp_rank)
            self._link = DaemonLink(
                make_client_factory(self.settings, self.settings.timeout),
                logger,
                timeout=self.settings.timeout,
                retry_interval=self.settings.retry_interval,
            )
            self._paged: PagedKV | None = None
            self._pool: dict[int, HostBufferPool] = {}
            self._load_errors: set[int] = set()
            self._errors_lock = threading.Lock()  # the loader thread adds errors too
            self._layer_loads: LayerLoads | None = None
            self._cuda_order: CudaOrder | None = None
            self._host_registrations: HostRegistrations | None = None
            self._forward_layers: list[str] = []
            self._paged_index: dict[str, int] = {}
            self._saver = _Saver(
                DaemonLink(
                    make_client_factory(self.settings, self.settings.timeout),
                    logger,
                    timeout=self.settings.timeout,
                    retry_interval=self.settings.retry_interval,
                )
            )
            self.stats = {
                "loaded_chunks": 0,
                "failed_chunks": 0,
                "saved_chunks": 0,
                "dropped_chunks": 0,
                "layers_waited": 0,
                "layers_overlapped": 0,
            }

    # ---------------------------------------------------------------- shared helpers

    def _resolve_chunk_size(self) -> int:
        chunk_size = self.settings.chunk_size
        source = "lmcached.chunk_size"
        if chunk_size is None:
            chunk_size = self._link.chunk_size()
            source = "the daemon's chunk_size"
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE
            source = "the default chunk size (daemon unreachable at start)"
            logger.warning(
                "LMCachedConnector: lmcached unreachable at start and lmcached.chunk_size not "
                "set; using %d. Set lmcached.chunk_size to the daemon's chunk_size to be sure "
                "that every engine builds the same keys.",
                chunk_size,
            )
        check_chunk_size(chunk_size, self.block_size, source)
        return chunk_size

    def _builder(self, chunk_size: int, tp_rank: int, pp_rank: int) -> KeyBuilder:
        builder = self._key_builders.get((chunk_size, tp_rank, pp_rank))
        if builder is None:
            builder = key_builder(self._vllm_config, chunk_size, tp_rank, pp_rank)
            self._key_builders[(chunk_size, tp_rank, pp_rank)] = builder
        return builder

    def _keys(
        self, tokens: Sequence[int], extra: bytes, chunk_size: int, tp_rank: int, pp_rank: int
    ) -> list[bytes]:
        """Return the keys of ``tokens``: whole chunks, then a trailing partial chunk's if any."""
        builder = self._builder(chunk_size, tp_rank, pp_rank)
        return builder.prompt_keys(list(tokens), extra=extra).all()

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Return how many tokens past ``num_computed_tokens`` lmcached can supply (sync load)."""
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._lookup(request)
            self._requests[request.request_id] = state
        state.asked_from = num_computed_tokens
        if not self.settings.load:
            return 0, False
        # Token-precise: every prompt token the daemon holds but the last, whose logits are
        # needed. vLLM lets a connector's hit end inside a block (the loaded block's remaining
        # slots are written by this step's forward pass).
        usable = min(state.hit_tokens, len(state.tokens) - 1)
        return max(0, usable - num_computed_tokens), False

    def _lookup(self, request: Request) -> _RequestState:
        tokens = list(request.prompt_token_ids or [])
        extra = request_extra(request)
        hit = 0
        if tokens and (self.settings.load or self.settings.save):
            # Normally one rank: one lookup. With TP/PP, a prefix is a hit only if every rank
            # holds it: shrink the hit until every rank has confirmed the current length.
            hit = len(tokens)
            confirmed: set[tuple[int, int]] = set()
            while hit > 0 and len(confirmed) < len(self._ranks):
                for rank in self._ranks:
                    if rank in confirmed:
                        continue
                    held = self._held_prefix(tokens[:hit], extra, *rank)
                    if held < hit:
                        hit, confirmed = held, set()
                    confirmed.add(rank)
                    if hit == 0:
                        break
        chunk_size = self.chunk_size
        return _RequestState(
            tokens=tokens,
            extra=extra,
            hit_tokens=hit,
            saved_chunks=hit // chunk_size,
            partial_saved=hit == len(tokens),
        )

    def _held_prefix(self, tokens: list[int], extra: bytes, tp_rank: int, pp_rank: int) -> int:
        """Return how many leading ``tokens`` one rank's keys in the daemon cover.

        One lookup of the prompt's keys (whole chunks, then its own partial chunk; all on one
        worker, so one round trip). If that falls short, one ``exists`` for the partial chunks
        that a shorter prompt with the same start may have stored where the hit ends (a chat's
        next turn extends the previous one): the longest one held extends the hit.
        """
        chunk_size = self.chunk_size
        builder = self._builder(chunk_size, tp_rank, pp_rank)
        keys = builder.prompt_keys(tokens, extra=extra)
        held = self._link.lookup(keys.all())
        if held == len(keys.all()):
            return len(tokens)
        whole = min(held, len(keys.whole))
        longest = chunk_size - 1 if whole < len(keys.whole) else keys.partial_tokens - 1
        if longest <= 0 or self._link.is_down:
            return whole * chunk_size
        candidates = builder.partial_keys(tokens, whole, range(1, longest + 1), extra=extra)
        lengths = sorted(candidates)
        present = self._link.exists([candidates[n] for n in lengths])
        found = [n for n, here in zip(lengths, present, strict=False) if here]
        return whole * chunk_size + (max(found) if found else 0)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Remember which tokens to load into the blocks just allocated for ``request``."""
        state = self._requests.get(request.request_id)
        if state is None or num_external_tokens <= 0:
            return
        start = state.asked_from
        state.pending_load = (start, start + num_external_tokens)
        state.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Turn this step's scheduled requests into loads and saves for the workers."""
        meta = LMCachedConnectorMetadata(chunk_size=self.chunk_size, block_size=self.block_size)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, state, new.num_computed_tokens + scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._plan(meta, req_id, state, computed)
        return meta

    def _chunk_blocks(self, state: _RequestState, chunk: int, tokens: int) -> list[int]:
        """Return the blocks that hold chunk ``chunk`` of a prefix of ``tokens`` tokens."""
        start = chunk * self.chunk_size
        count = -(-min(self.chunk_size, tokens - start) // self.block_size)
        first = start // self.block_size
        return state.block_ids[first : first + count]

    def _plan(
        self, meta: LMCachedConnectorMetadata, req_id: str, state: _RequestState, computed: int
    ) -> None:
        chunk_size = self.chunk_size
        if state.pending_load is not None:
            start, end = state.pending_load
            state.pending_load = None
            # The chunks that hold tokens [start, end), keyed as the daemon holds them: whole
            # chunks, and a partial one if the hit ends in one.
            source = min(state.hit_tokens, -(-end // chunk_size) * chunk_size)
            first, last = start // chunk_size, -(-end // chunk_size)
            meta.loads.append(
                LoadSpec(
                    req_id=req_id,
                    tokens=state.tokens[:source],
                    extra=state.extra,
                    first_chunk=first,
                    chunk_blocks=[self._chunk_blocks(state, c, source) for c in range(first, last)],
                    start_token=start,
                    end_token=end,
                )
            )
        if not self.settings.save:
            return
        # Save prompt chunks whose every token has been computed by the end of this step, and
        # the prompt's trailing partial chunk once the whole prompt is computed (at most one
        # partial chunk per prompt).
        length = len(state.tokens)
        done = min(computed, length)
        complete = done // chunk_size
        complete = min(complete, len(state.block_ids) * self.block_size // chunk_size)
        chunks = list(range(state.saved_chunks, complete))
        end = complete * chunk_size
        partial = length % chunk_size
        if (
            partial
            and self.settings.save_partial_chunks
            and done == length
            and not state.partial_saved
            and complete == length // chunk_size
            and len(self._chunk_blocks(state, complete, length)) == -(-partial // self.block_size)
        ):
            chunks.append(complete)
            end = length
            state.partial_saved = True
        if chunks:
            meta.saves.append(
                SaveSpec(
                    req_id=req_id,
                    tokens=state.tokens[:end],
                    extra=state.extra,
                    first_chunk=chunks[0],
                    chunk_blocks=[self._chunk_blocks(state, c, end) for c in chunks],
                )
            )
            state.saved_chunks = max(state.saved_chunks, complete)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. Saves copy their data out in the step they run, so blocks can go."""
        self._requests.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the paged KV tensors that loads scatter into and saves gather from."""
        self._paged = PagedKV(kv_caches, self.num_blocks)
        self._paged_index = {name: i for i, name in enumerate(self._paged.names)}
        self._forward_layers = layer_order(self._paged.names)
        logger.info(
            "LMCachedConnector (worker tp%d pp%d): %d layers, %d bytes per block, layout %s",
            self.tp_rank,
            self.pp_rank,
            len(self._paged.names),
            self._paged.block_nbytes,
            self.layout,
        )

    def _buffers(self, blocks_per_chunk: int, count: int) -> tuple[HostBufferPool, list[Any]]:
        assert self._paged is not None
        pool = self._pool.get(blocks_per_chunk)
        if pool is None:
            pool = HostBufferPool(
                self._paged.block_nbytes * blocks_per_chunk,
                pin=self._paged.on_gpu,
                register=self._register_host_buffers,
            )
            self._pool[blocks_per_chunk] = pool
        return pool, pool.acquire(count)

    def _load_mode(self) -> str:
        """The configured load mode, with ``auto`` resolved by where the KV cache lives."""
        mode = self.settings.load_mode
        if mode == "auto":
            return "layerwise" if self._paged is not None and self._paged.on_gpu else "sync"
        return mode

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads: layer by layer on the loader thread, overlapping the
        forward pass (``lmcached.load_mode`` layerwise; auto on a GPU), or all before it (sync;
        auto on a CPU).
        """
        self._finish_layer_loads()  # a previous step's, if vLLM skipped wait_for_save
        meta = self._connector_metadata
        if not isinstance(meta, LMCachedConnectorMetadata) or not meta.loads or self._paged is None:
            return
        pieces = self._fetch(meta)
        if self._paged.on_gpu:
            # After the get: it maps the arenas it reads from (the first ones, or a restarted
            # worker's new one), so this step's copies already run from registered memory.
            self._register_arenas()
        if self._load_mode() == "sync":
            for piece in pieces:
                self._paged.scatter(piece.payload, piece.blocks, piece.positions)
            if self._paged.on_gpu:
                import torch

                torch.cuda.current_stream(self._paged.device).synchronize()  # reads done
            self._report_lost(pieces)
            return
        # A load that ends inside a block shares that block with this step's forward pass,
        # which writes a layer's new KV into it *before* it asks for that layer's loaded KV.
        # So that block is copied now, whole (a block's slot layout is the backend's own), and
        # the rest layer by layer while the forward pass runs.
        for piece in pieces:
            if piece.edge is not None:
                self._paged.scatter(piece.payload, piece.blocks, [piece.edge])
        loads = LayerLoads(self._forward_layers, self._device_order())
        loads.sources = pieces
        loads.start(lambda done: self._load_layers(pieces, done))
        self._layer_loads = loads

    def _register_arenas(self) -> None:
        """Page-lock the daemon's shared-memory arenas for CUDA (once each), so that loads copy
        from them by DMA on the side stream, straight from the arena."""
        arenas = self._link.arenas()
        if arenas or not self._link.is_down:  # a daemon that is down keeps its registrations
            self._registrations().register_arenas(arenas)

    def _registrations(self) -> HostRegistrations:
        if self._host_registrations is None:
            import torch

            self._host_registrations = HostRegistrations(torch.cuda.cudart())
        return self._host_registrations

    def _register_host_buffers(self, address: int, size: int) -> bool:
        """Page-lock a slab of the save buffers (written by device-to-host copies)."""
        return self._registrations().register(address, size, read_only=False)

    def _device_order(self) -> DeviceOrder:
        assert self._paged is not None
        if not self._paged.on_gpu:
            return HostOrder()
        if self._cuda_order is None:
            import torch

            self._cuda_order = CudaOrder(torch.cuda, self._paged.device)
        return self._cuda_order

    def _load_layers(self, pieces: list[_LoadPiece], done: Callable[[int], None]) -> None:
        """The loader thread's work: copy the fetched chunks in, layer by layer."""
        assert self._paged is not None
        views = [self._paged.views(piece.payload, len(piece.blocks)) for piece in pieces]
        # Made here, on the loader's stream, once for every layer.
        plan = self._paged.load_plan(
            [(piece.blocks, [p for p in piece.positions if p != piece.edge]) for piece in pieces]
        )
        for position, name in enumerate(self._forward_layers):
            layer = self._paged_index[name]
            self._paged.load_layer(layer, [piece_views[layer] for piece_views in views], plan)
            done(position)

    def _fetch(self, meta: LMCachedConnectorMetadata) -> list[_LoadPiece]:
        """Fetch every chunk of this step's loads in one batched get; return what to copy.

        Chunks that cannot be loaded are recorded as load errors (vLLM recomputes them).
        """
        keys: list[bytes] = []
        for load in meta.loads:
            count = len(load.chunk_blocks)
            load_keys = self._keys(
                load.tokens, load.extra, meta.chunk_size, self.tp_rank, self.pp_rank
            )[load.first_chunk : load.first_chunk + count]
            keys.extend(load_keys if len(load_keys) == count else [b""] * count)
        # Zero-copy views of the received data: the scatter is the one copy of a load.
        wanted = [k for k in keys if k]
        fetched = self._link.get(wanted)
        received = iter(fetched if len(fetched) == len(wanted) else [None] * len(wanted))
        values = iter([next(received) if k else None for k in keys])
        pieces: list[_LoadPiece] = []
        for load in meta.loads:
            load_values = [next(values) for _ in load.chunk_blocks]
            pieces.extend(self._pieces(meta, load, load_values))
        return pieces

    def _pieces(
        self, meta: LMCachedConnectorMetadata, load: LoadSpec, values: list[Any]
    ) -> list[_LoadPiece]:
        assert self._paged is not None
        block_size = meta.block_size
        blocks_per_chunk = meta.chunk_size // block_size
        first_block = load.start_token // block_size
        end_block = -(-load.end_token // block_size)
        ends_inside_a_block = load.end_token % block_size != 0

        def in_load(chunk: int, position: int) -> bool:
            return first_block <= chunk * blocks_per_chunk + position < end_block

        pieces = []
        for i, (value, blocks) in enumerate(zip(values, load.chunk_blocks, strict=True)):
            chunk = load.first_chunk + i
            # A partial chunk holds fewer blocks; its last block is partly filled.
            expected = self._paged.block_nbytes * len(blocks)
            size = None if value is None else memoryview(value).nbytes
            if size != expected:
                if size is not None:
                    self._link.log.warning(
                        "size",
                        "LMCachedConnector: stored chunk has %d bytes, expected %d; recomputing",
                        size,
                        expected,
                    )
                # vLLM recomputes from the first failed block: report every block of the load
                # from this chunk on.
                failed = [
                    block
                    for j, later in enumerate(load.chunk_blocks[i:])
                    for p, block in enumerate(later)
                    if in_load(chunk + j, p)
                ]
                with self._errors_lock:
                    self._load_errors.update(failed)
                self.stats["failed_chunks"] += len(load.chunk_blocks) - i
                break
            wanted = [p for p in range(len(blocks)) if in_load(chunk, p)]
            ends_here = bool(wanted) and chunk * blocks_per_chunk + wanted[-1] == end_block - 1
            pieces.append(
                _LoadPiece(
                    payload=payload_tensor(value),
                    received=value,
                    blocks=blocks,
                    positions=wanted,
                    edge=wanted[-1] if ends_here and ends_inside_a_block else None,
                    load_blocks=[b for p, b in enumerate(blocks) if in_load(chunk, p)],
                )
            )
            self.stats["loaded_chunks"] += 1
        return pieces

    def _finish_layer_loads(self) -> None:
        """Wait for the step's loader (done by now: the forward pass waited for every layer)."""
        loads, self._layer_loads = self._layer_loads, None
        if loads is None:
            return
        pieces = list(loads.sources)
        loads.join()  # every copy is complete (the side stream waited for the edge copies too)
        self._report_lost(pieces)
        self.stats["layers_waited"] += loads.waits
        self.stats["layers_overlapped"] += loads.overlapped
        if loads.error is not None:
            logger.error("LMCachedConnector: a layer-wise load failed: %r", loads.error)
            # Nothing of this step's loads can be trusted: vLLM recomputes all of it.
            meta = self._connector_metadata
            failed: set[int] = set()
            for load in meta.loads if isinstance(meta, LMCachedConnectorMetadata) else []:
                for blocks in load.chunk_blocks:
                    failed.update(blocks)
            failed.update(b for piece in pieces for b in piece.load_blocks)
            with self._errors_lock:
                self._load_errors.update(failed)

    def _report_lost(self, pieces: list[_LoadPiece]) -> None:
        """Report the chunks whose slot was reused while they were copied as load errors
        (vLLM recomputes them, and discards what this step computed from them)."""
        lost = self._link.lost([piece.received for piece in pieces])
        if not lost:
            return
        self._link.log.warning(
            "lease",
            "LMCachedConnector: %d loaded chunks outlived their lease (lease_timeout); "
            "recomputing them",
            len(lost),
        )
        with self._errors_lock:
            for i in lost:
                self._load_errors.update(pieces[i].load_blocks)
        self.stats["failed_chunks"] += len(lost)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Wait until ``layer_name``'s loaded KV is in place (layer-wise loads)."""
        if self._layer_loads is not None:
            self._layer_loads.wait(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Do nothing per layer: :meth:`wait_for_save` gathers all layers of a chunk at once."""
        return

    def wait_for_save(self) -> None:
        """Gather this step's complete chunks into host buffers and queue them for the daemon.

        Never waits for earlier saves: they run on the saver thread while the next forward pass
        runs. The gather (the one copy out of the paged KV) is the only work done here; it must
        finish before the next step may write into (or vLLM may reuse) these blocks.
        """
        self._finish_layer_loads()
        meta = self._connector_metadata
        if not isinstance(meta, LMCachedConnectorMetadata) or not meta.saves or self._paged is None:
            return
        for save in meta.saves:
            count = len(save.chunk_blocks)
            keys = self._keys(save.tokens, save.extra, meta.chunk_size, self.tp_rank, self.pp_rank)
            keys = keys[save.first_chunk : save.first_chunk + count]
            # Queued even while the saver's link is marked down: that mark may be stale (see
            # _Saver._run), and the backlog limit below bounds what an outage can hold.
            if not count or len(keys) != count:
                continue
            nbytes = self._paged.block_nbytes * sum(len(b) for b in save.chunk_blocks)
            if not self._saver.admit(nbytes):
                # The daemon is slower than the engine: skip this save rather than make the
                # next forward pass wait for the previous ones.
                self.stats["dropped_chunks"] += count
                self._saver.link.log.warning(
                    "backlog",
                    "LMCachedConnector: %d bytes of saves still queued; skipping %d chunks",
                    self._saver.backlog,
                    count,
                )
                continue
            # One pool, so one slab, for the whole save (a partial chunk fills the start of a
            # whole chunk's buffer): its put then names one buffer (HostBufferPool).
            pool, taken = self._buffers(max(len(b) for b in save.chunk_blocks), count)
            parts = [
                buffer[: self._paged.block_nbytes * len(blocks)]
                for blocks, buffer in zip(save.chunk_blocks, taken, strict=True)
            ]
            # On a GPU every chunk's copies are queued before the one wait for them.
            self._paged.gather_chunks(list(zip(save.chunk_blocks, parts, strict=True)))
            self._saver.submit(keys, [(part, pool) for part in parts], nbytes)
            self.stats["saved_chunks"] += count

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Return (and forget) the blocks whose load failed in this step."""
        self._finish_layer_loads()
        with self._errors_lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Finish queued saves (bounded by the timeout), stop the saver, close the clients."""
        if self._role == KVConnectorRole.WORKER:
            self._finish_layer_loads()
            self._saver.close()
            if self._host_registrations is not None:
                self._host_registrations.close()
        self._link.close()


# Host bytes of gathered chunks that may wait for the saver thread; beyond it, saves are skipped
# (counted in stats["dropped_chunks"]) instead of making a forward pass wait.
SAVE_BACKLOG_BYTES = 1 << 30


class _Saver:
    """The worker's saver thread: skip chunks the daemon has, put the rest, free the buffers."""

    def __init__(self, link: DaemonLink, backlog_limit: int = SAVE_BACKLOG_BYTES) -> None:
        self.link = link
        self.backlog_limit = backlog_limit
        self.backlog = 0  # bytes admitted and not yet done
        self._jobs: queue.Queue[
            tuple[list[bytes], list[tuple[Any, HostBufferPool]], int] | None
        ] = queue.Queue()
        self._idle = threading.Condition()
        self._closed = False
        self._stop = threading.Event()
        self.dropped = 0  # chunks not stored: the daemon was down or refused the put
        self._thread = threading.Thread(target=self._run, name="lmcached-saver", daemon=True)
        self._thread.start()

    def admit(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of backlog for a save; False if that would pass the limit.

        A save larger than the whole limit is still admitted when nothing is queued, so that
        a long prompt is never refused for its size alone.
        """
        with self._idle:
            if self.backlog and self.backlog + nbytes > self.backlog_limit:
                return False
            self.backlog += nbytes
            return True

    def submit(
        self, keys: list[bytes], buffers: list[tuple[Any, HostBufferPool]], nbytes: int
    ) -> None:
        """Queue an admitted save: ``buffers`` are (buffer, the pool it goes back to) pairs."""
        self._jobs.put((keys, buffers, nbytes))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            keys, buffers, nbytes = job
            try:
                if self.link.is_down and self._jobs.empty():
                    # The newest save while the link is marked down. The mark may be stale: a
                    # call in flight across a daemon restart fails at its deadline, after the
                    # daemon is back, and marks the link down for retry_interval more. Dropping
                    # this save would lose the prompt for good, so wait the mark out and try.
                    # Older saves (others queued behind) are dropped at once below, so that an
                    # outage holds at most the saves of one retry interval.
                    self._stop.wait(self.link.down_for())
                have = self.link.exists(keys)
                missing = [i for i, present in enumerate(have) if not present]
                # numpy views share the tensors' memory: the client sends them zero-copy.
                if (
                    missing
                    and len(have) == len(keys)
                    and not self.link.put(
                        [keys[i] for i in missing], [buffers[i][0].numpy() for i in missing]
                    )
                ):
                    self.dropped += len(missing)
            except Exception:
                # A bug here must cost a save, never the engine: keep the thread alive.
                logger.exception("LMCachedConnector: saving %d chunks failed", len(keys))
            finally:
                for buffer, pool in buffers:
                    pool.release([buffer])
                with self._idle:
                    self.backlog -= nbytes
                    self._idle.notify_all()

    def close(self) -> None:
        """Let queued saves finish (each bounded by the link's timeout), then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()  # a save waiting out a down mark gives up now
        self._jobs.put(None)
        self._thread.join()
        self.link.close()
