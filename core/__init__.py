"""Shared value types (core.values); imports nothing else of moebench."""
