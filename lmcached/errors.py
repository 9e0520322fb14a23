"""The error hierarchy that clients and the CLI catch.

Transient errors (the daemon is down, restarting or slow) derive from ``LMCachedUnavailable`` so a
caller can retry them; a bad request (``LMCachedRequestError``) is the caller's bug and retrying
will not help.
"""

from __future__ import annotations


class LMCachedError(Exception):
    """Root of every error lmcached raises on purpose."""


class LMCachedUnavailable(LMCachedError):
    """The daemon, or the worker owning a key, cannot be reached right now."""


class LMCachedTimeout(LMCachedUnavailable):
    """A call did not complete before its deadline."""


class LMCachedBusy(LMCachedUnavailable):
    """The worker is at its in-flight bound (``busy``): back off and retry the call."""


class LMCachedRequestError(LMCachedError):
    """The daemon rejected a request as malformed or over a limit."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class StartupError(LMCachedError):
    """The daemon cannot start or keep running: a port or socket is taken, the runtime folder is
    in use, or its workers cannot start. The message is the one-line reason."""


class LMCachedLeaseExpired(LMCachedRequestError):
    """A zero-copy view from shared memory was read after its slot was evicted or reused.

    Raised by ``check()`` of such a view (and by ``get_into`` in the rare case the slot went
    while copying): the bytes read are not trusted; fetch the key again.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code="lease_expired")


class ConfigError(LMCachedError):
    """A configuration value is missing, unknown or invalid."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.source = source
        self.message = message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass; ``problems`` holds each one."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        LMCachedError.__init__(
            self, f"{len(self.problems)} problems: " + "; ".join(str(p) for p in self.problems)
        )
        self.key = first.key
        self.source = first.source
        self.message = first.message


# Worker exit codes the scheduler reads as "restarting will not help": it stops the daemon.
# A plugin raised in on_startup under strict_plugins (sysexits' EX_CONFIG, documented).
EXIT_PLUGIN_FATAL = 78
# The worker's store cannot be built from this config (an unknown policy or codec, a plugin that
# cannot be imported or fails its interface check ...); the worker logs the one-line reason.
# sysexits' EX_DATAERR, since EX_CONFIG already means the above.
EXIT_CONFIG_INVALID = 65
# A worker failed to start worker_start_attempts times in a row (sysexits' EX_SOFTWARE).
EXIT_WORKERS_CANNOT_START = 70
