"""Example lmcached extensions, installable with pip; see plugins.yaml and register.py."""
