"""core/files.py: atomic replacement, and creation by the first writer only."""
from __future__ import annotations

from core.files import create_once, write_text_atomic


def test_create_once_keeps_the_first_writers_text(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    assert create_once("first\n", path) == "first\n"
    assert create_once("second\n", path) == "first\n"  # a later writer reads what is there
    assert path.read_text() == "first\n"
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temp file left behind


def test_write_text_atomic_replaces(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic("one", path)
    write_text_atomic("two", path)
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
