"""Systems from outside moebench (systems/plugins.py): by file, by module:Class and by entry point,
through `list`, `check` and `run` in real processes; bad references are one line and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import systems
from harness.errors import UsageError
from harness.identity import trial_id, work_key
from harness.trial_spec import TrialSpec
from systems import plugins

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_moe_plugin.py"
EXAMPLE_REF = f"{EXAMPLE}:MyMoESystem"

TWO_SYSTEMS = '''from systems.torch_reference import TorchReference


class First(TorchReference):
    name = "first_ref"


class Second(TorchReference):
    name = "second_ref"
'''
# An imported system (TorchReference) does not count as the file's own; its options work like a built-in's.
KNOBBED = '''from systems.torch_reference import TorchReference


class Knobbed(TorchReference):
    name = "knobbed_ref"
    options = {"scale": "a knob only this plugin declares"}
'''
CLASHING = KNOBBED.replace('"knobbed_ref"', '"torch_reference"')


def harness(*args, cwd=ROOT, pythonpath=None, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p)
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *fragments) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def registry(monkeypatch):
    """This process's plugin registry, emptied for the test and restored after it."""
    for attr, value in (("_BY_NAME", {}), ("_REFERENCE", {}), ("_FILE_MODULES", {}), ("_entry_points", None),
                        ("_ignored_entry_points", {})):
        monkeypatch.setattr(plugins, attr, value)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return plugins


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder that is an installed distribution with moebench.systems entry points, as pip leaves it:
    the example as module user_moe (its system renamed ep_moe), a broken entry point, and one named
    like a built-in."""
    root = tmp_path_factory.mktemp("site")
    (root / "user_moe.py").write_text(EXAMPLE.read_text().replace('name = "my_moe"', 'name = "ep_moe"'))
    info = root / "user_moe_systems-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-moe-systems\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moebench.systems]\nep_moe = user_moe:MyMoESystem\n"
                                           "broken_moe = no_such_module_for_moebench:Nope\n"
                                           "torch_reference = user_moe:MyMoESystem\n")
    return root


# ----------------------------------------------------------------- real processes

def test_list_shows_file_plugin_and_entry_points(site):
    proc = harness("list", "--json", "--system-plugin", "examples/my_moe_plugin.py", pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = {r["name"]: r for r in data["systems"]}
    assert rows["my_moe"]["available"] and rows["my_moe"]["source"] == f"plugin {EXAMPLE_REF}"
    assert rows["ep_moe"]["available"] and rows["ep_moe"]["source"].startswith("entry point ep_moe = user_moe:")
    assert "user-moe-systems" in rows["ep_moe"]["source"]
    broken = rows["broken_moe"]
    assert broken["available"] is False and "No module named 'no_such_module_for_moebench'" in broken["reason"]
    assert rows["torch_reference"]["source"] == "built-in"  # the entry point named like it is ignored
    assert "named like a built-in" in data["ignored_entry_points"]["torch_reference"]


def test_check_passes_by_path_by_module_class_and_by_entry_point(tmp_path, site):
    """One `check` process: each system's cases run in a fresh worker, which registers the plugin itself."""
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "user_moe_mod.py").write_text(EXAMPLE.read_text().replace('name = "my_moe"', 'name = "mod_moe"'))
    out = tmp_path / "check.json"
    proc = harness("check", "--system-plugin", "examples/my_moe_plugin.py", "--system-plugin",
                   "user_moe_mod:MyMoESystem", "--systems", "my_moe,mod_moe,ep_moe", "--out", out,
                   pythonpath=os.pathsep.join(map(str, (site, modules))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all available systems pass" in proc.stdout
    written = json.loads(out.read_text())
    assert written["passed"] and not written["unavailable"]
    by_system: dict[str, list] = {}
    for row in written["results"]:
        by_system.setdefault(row["system"], []).append(row)
        assert row["status"] == "pass", row
        assert set(row["rel_err"]) >= {"y", "dx", "grad_gate_EM", "grad_w1_EHM", "grad_w2_EHM"}
        assert "dropless" in row["note"]
    assert {name: len(rows) for name, rows in by_system.items()} == {"my_moe": 10, "mod_moe": 10, "ep_moe": 10}
    mine = {r["case"]: r for r in by_system["my_moe"]}
    assert "grad_w3_EHM" in mine["top2-swiglu-cf1-fp32"]["rel_err"] and "grad_b1_EH" in mine[
        "top2-gelu-bias-cf1-fp32"]["rel_err"]
    assert mine["top2-swiglu-cf1-fp32"]["routing"]["dropped"] == 0


def test_run_a_file_plugin_from_another_directory(tmp_path):
    """A relative path is resolved against the caller's directory; the trial child (cwd: the repository)
    gets the absolute reference in its spec and registers the plugin itself."""
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "my_moe_plugin.py").write_text(EXAMPLE.read_text())
    proc = harness("run", "--system-plugin", "plugin/my_moe_plugin.py", "--systems", "my_moe", "--workload",
                   "mixtral-8x7b", "--flavor", "debug", "--repeats", "1", "--steps", "1", "--warmup", "0",
                   "--out", tmp_path / "results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (path,) = (tmp_path / "results").glob("*.json")
    (trial,) = json.loads(path.read_text())["trials"]
    assert trial["system"] == "my_moe" and trial["status"] == "ok", trial["message"]
    assert trial["check"]["passed"] is True and "dropless" in trial["check"]["note"]
    assert trial["routing_stats"]["dropped"] == 0 and trial["routing_stats"]["capacity"] is None
    assert trial["plugins"] == [f"{tmp_path / 'plugin' / 'my_moe_plugin.py'}:MyMoESystem"]


def test_bad_references_are_one_line_exit_2(tmp_path, registry, capsys):
    """Two in real processes (at once), the rest through the same CLI entry point in this process."""
    from harness.cli import main

    (tmp_path / "two.py").write_text(TWO_SYSTEMS)
    (tmp_path / "clash.py").write_text(CLASHING)
    in_processes = {
        "two systems": (["run", "--system-plugin", tmp_path / "two.py"],
                        ["defines 2 MoESystem subclasses (First, Second)", "two.py:ClassName"]),
        "missing module": (["list", "--system-plugin", "no_such_package_xyz.layer:System"],
                           ["cannot import plugin module 'no_such_package_xyz.layer'"]),
    }
    here = {
        "missing file": (["check", "--system-plugin", tmp_path / "nope.py"], ["nope.py does not exist"]),
        "missing class": (["run", "--system-plugin", f"{EXAMPLE}:NoSuchSystem"],
                          ["has no class 'NoSuchSystem'"]),
        "not a system": (["list", "--system-plugin", f"{EXAMPLE}:MyMoE"],
                         ["my_moe_plugin.py:MyMoE is not a subclass of systems.base.MoESystem"]),
        "built-in name": (["check", "--system-plugin", tmp_path / "clash.py"],
                          ["clash.py:Knobbed", "'torch_reference' is a built-in system's"]),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = {what: subprocess.Popen([sys.executable, "-m", "harness", *map(str, argv)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for what, (argv, _) in in_processes.items()}
    results = {}
    for what, (argv, _) in here.items():
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        results[what] = subprocess.CompletedProcess(argv, code, captured.out, captured.err)
    for what, proc in started.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[what] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    for what, (argv, fragments) in {**in_processes, **here}.items():
        line = one_line_error(results[what], *fragments)
        assert line.startswith(f"moebench {argv[0]}: error: "), (what, line)
    assert "torch_reference" in systems.system_names() and not plugins.plugin_names()  # nothing registered


# ----------------------------------------------------------------- in this process

def test_register_by_path_relative_to_cwd_once(registry, tmp_path, monkeypatch):
    (tmp_path / "knobbed.py").write_text(KNOBBED)
    monkeypatch.chdir(tmp_path)
    assert plugins.register_plugins(["knobbed.py"]) == ["knobbed_ref"]
    absolute = f"{tmp_path / 'knobbed.py'}:Knobbed"
    assert plugins.references_for("knobbed_ref") == (absolute,)
    cls = systems.load_system_class("knobbed_ref")
    assert plugins.register_plugins([absolute, "./knobbed.py:Knobbed"]) == ["knobbed_ref", "knobbed_ref"]  # no-op
    assert systems.load_system_class("knobbed_ref") is cls
    assert "knobbed_ref" in systems.system_names() and systems.availability("knobbed_ref").ok
    assert sys.modules[cls.__module__].Knobbed is cls  # importable by its module name (pickling, dataclasses)
    assert plugins.references_for("torch_reference") == ()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "knobbed.py").write_text(KNOBBED)  # the same name from another file is a clash
    with pytest.raises(ValueError, match="already registered by .*knobbed.py:Knobbed"):
        plugins.register_plugins(["knobbed.py"], base_dir=other)


def test_a_plugin_file_imports_modules_next_to_it(registry, tmp_path):
    (tmp_path / "users_layer.py").write_text(EXAMPLE.read_text().replace('name = "my_moe"', 'name = "side_moe"'))
    (tmp_path / "wrapper.py").write_text("from users_layer import MyMoESystem  # noqa: F401\n")
    assert plugins.register_plugins([f"{tmp_path / 'wrapper.py'}:MyMoESystem"]) == ["side_moe"]
    with pytest.raises(ValueError, match="defines no MoESystem subclass"):  # imported, not defined there
        plugins.register_plugins([str(tmp_path / "wrapper.py")])


def test_run_includes_plugins_and_their_options(registry, monkeypatch, tmp_path):
    from harness.commands.run import select_systems, system_options

    monkeypatch.setattr(systems, "REGISTRY", {"torch_reference": systems.REGISTRY["torch_reference"]})
    (tmp_path / "knobbed.py").write_text(KNOBBED)
    assert plugins.register_plugins([str(EXAMPLE), str(tmp_path / "knobbed.py")]) == ["my_moe", "knobbed_ref"]
    names, unavailable = select_systems(None)  # no --systems: the available built-ins and the plugins
    assert names == ["torch_reference", "my_moe", "knobbed_ref"] and not unavailable
    args = argparse.Namespace(option=["scale=2"], variant=["knobbed_ref:scale=3"])
    assert system_options(args, names) == [("torch_reference", {}), ("my_moe", {}), ("knobbed_ref", {"scale": 2}),
                                           ("knobbed_ref", {"scale": 3})]
    with pytest.raises(UsageError, match="my_moe has no option 'scale'"):
        system_options(argparse.Namespace(option=["my_moe.scale=2"], variant=[]), names)


def test_a_broken_entry_point_is_unavailable_not_a_crash(registry, monkeypatch, site):
    from harness.commands.run import select_systems, system_options

    monkeypatch.setattr(systems, "REGISTRY", {"torch_reference": systems.REGISTRY["torch_reference"]})
    monkeypatch.syspath_prepend(str(site))
    names, unavailable = select_systems(None)
    assert names == ["torch_reference", "ep_moe"] and "no_such_module_for_moebench" in unavailable["broken_moe"]
    names, unavailable = select_systems("broken_moe")  # asked for by name: kept, and recorded as skipped
    assert names == ["broken_moe"] and system_options(argparse.Namespace(option=[], variant=[]), names) == [
        ("broken_moe", {})]
    with pytest.raises(ValueError, match="already the entry point ep_moe"):  # same name, another class
        plugins.register_plugins([str(site / "user_moe.py")])
    assert plugins.register_plugins(["user_moe:MyMoESystem"]) == ["ep_moe"]  # the entry point's own class


def test_trial_spec_carries_plugins_and_identity_only_for_plugins():
    from core.values import MoEKnobs, ParallelSpec
    from harness.runner import trial_record
    from workloads.flavors import get_workload

    base = TrialSpec("torch_reference", get_workload("mixtral-8x7b", "debug"), "layer", "forward_backward",
                     "learned", MoEKnobs(), ParallelSpec())
    spec = base.with_changes(system="my_moe", plugins=(EXAMPLE_REF,))
    assert TrialSpec.from_json(spec.to_json()) == spec and TrialSpec.from_json(base.to_json()) == base
    old = json.loads(base.to_json())
    del old["plugins"]  # a spec file written before plugins existed
    assert TrialSpec.from_dict(old) == base
    builtin = trial_record(base, [])
    assert "plugins" not in builtin
    assert trial_id(builtin) == trial_id({**builtin, "plugins": []})  # built-in ids are what they were
    plugin = trial_record(spec, [])
    elsewhere = {**plugin, "plugins": ["/elsewhere/my_moe_plugin.py:MyMoESystem"]}
    assert plugin["plugins"] == [EXAMPLE_REF] and trial_id(plugin) != trial_id(elsewhere)
    assert work_key(plugin) == work_key(elsewhere) == work_key(builtin)  # the work key names no system


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own system as a plugin", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == EXAMPLE.read_text()
    assert len(EXAMPLE.read_text().splitlines()) < 60
    for command in ("./moebench check --system-plugin examples/my_moe_plugin.py",
                    "./moebench run --system-plugin examples/my_moe_plugin.py --systems my_moe,tutel_native "
                    "--workload mixtral-8x7b --flavor debug", '[project.entry-points."moebench.systems"]'):
        assert command in section
    assert readme.index("## Commands") < readme.index("## Your own system as a plugin") < readme.index("## Workloads")
