"""Integrations of lmcached with serving engines (vLLM)."""
