"""A scratch git repository holding the slowed_tutel plugin, committed once per variant.

What a project that adopts moebench looks like to `moebench gate --baseline-ref`:
its own repository, one plugin file, one suite file. Used by the gate's tests
and by benchmarks/gate_calibration.py.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

PLUGIN = Path(__file__).with_name("slowed_tutel.py")
GIT_IDENTITY = ["-c", "user.email=gate@moebench.invalid", "-c", "user.name=moebench gate test"]


def suite_text(budget_s: float, workload: str = "mixtral-8x7b", flavor: str = "proxy", quartets: int = 3,
               extra: str = "") -> str:
    return (f'[suite]\nname = "plugin-gate"\nbudget_s = {budget_s}\nsystem_plugins = ["slowed_tutel.py"]\n\n'
            f'[[benchmark]]\nname = "layer"\nworkload = "{workload}"\nflavor = "{flavor}"\n'
            f'systems = ["slowed_tutel"]\nquartets = {quartets}\n{extra}')


def plugin_text(slowdown: float = 0.0, output_change: float = 0.0) -> str:
    text = PLUGIN.read_text()
    text = re.sub(r"^SLOWDOWN = .*$", f"SLOWDOWN = {slowdown!r}", text, count=1, flags=re.M)
    return re.sub(r"^OUTPUT_CHANGE = .*$", f"OUTPUT_CHANGE = {output_change!r}", text, count=1, flags=re.M)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(repo: Path, suite: str, variants: list[dict]) -> list[str]:
    """A repository whose commits hold the plugin with each variant's constants, in order; the
    working tree is left at the last. Returns the commits."""
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "--quiet")
    (repo / "suite.toml").write_text(suite)
    commits = []
    for n, variant in enumerate(variants):
        (repo / "slowed_tutel.py").write_text(plugin_text(**variant))
        _git(repo, "add", "suite.toml", "slowed_tutel.py")
        _git(repo, "commit", "--quiet", "--allow-empty", "-m", f"variant {n}: {variant}")
        commits.append(_git(repo, "rev-parse", "HEAD"))
    return commits


def set_working_tree(repo: Path, **variant) -> None:
    """An uncommitted candidate: the plugin with these constants in the working tree."""
    (repo / "slowed_tutel.py").write_text(plugin_text(**variant))
