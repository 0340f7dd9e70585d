"""The same command with the same seed computes the same thing on the same machine: equal routing
statistics and equal checksums of the verified values (output, input gradient, every canonical
gradient); another --seed changes both. The three runs go at once, each in its own process."""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from harness import schema

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["-m", "harness", "run", "--workload", "mixtral-8x7b", "--flavor", "debug", "--systems", "tutel_native",
           "--repeats", "1", "--steps", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> dict[str, dict]:
    """name -> the one trial record of: run "a" and run "b" (seed 0), run "other" (--seed 1)."""
    runs = {"a": [], "b": [], "other": ["--seed", "1"]}
    out = {name: tmp_path_factory.mktemp(name) for name in runs}
    procs = {name: subprocess.Popen([sys.executable, *COMMAND, *extra, "--out", str(out[name])], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in runs.items()}
    records = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        (path,) = glob.glob(str(out[name] / "*.json"))
        (records[name],) = schema.load(path)["trials"]
        assert records[name]["status"] == "ok", records[name]["message"]
    return records


def test_same_seed_gives_identical_routing_and_checksums(trials):
    a, b = trials["a"], trials["b"]
    assert a["routing_stats"] == b["routing_stats"]
    assert a["check"]["passed"] and b["check"]["passed"]
    assert a["check"]["checksum"] == b["check"]["checksum"]
    assert set(a["check"]["checksum"]["ranks"][0]["grads"]) >= {"gate_EM", "w1_EHM", "w2_EHM", "w3_EHM"}


def test_another_seed_changes_routing_and_checksums(trials):
    a, other = trials["a"], trials["other"]
    assert a["routing_stats"]["tokens_per_expert"] != other["routing_stats"]["tokens_per_expert"]
    assert a["check"]["checksum"] != other["check"]["checksum"]
    assert a["seed"] == 0 and other["seed"] == 1
