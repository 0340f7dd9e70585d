"""Errors the CLI turns into one clear line and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user (unknown name, invalid size, unreadable file)."""
