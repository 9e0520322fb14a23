"""Supervised child processes: script plugins (discovery, launcher, shim)."""
