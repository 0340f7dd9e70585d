"""Every bad input is one line naming the problem and exit code 2; a bug is exit 1 and says so.

One table (BAD_INPUTS) over the commands: each row is the argv of
``python -m harness ...`` and a fragment its one error line must contain.
The rows run in this process through harness.cli.main (fast); a few run
again as real processes to prove the exit code end to end. Files the rows
need (workload and suite TOML, a broken JSON file) are written once into a
temporary directory, named in the argv as {d}.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]

GOOD_LAYER = "[layer]\nmodel_dim = 16\nffn_dim = 32\nnum_experts = 4\ntop_k = 2\n"
SUITE_HEAD = '[suite]\nname = "t"\n\n[[benchmark]]\nname = "a"\nworkload = "mixtral-8x7b"\nflavor = "debug"\n'
FILES = {
    "ok.toml": GOOD_LAYER,
    "syntax.toml": "name = \"w\"\nbatch_size = = 4\n",
    "bad_value.toml": GOOD_LAYER.replace("ffn_dim = 32", "ffn_dim = 'wide'"),
    "top_k.toml": GOOD_LAYER.replace("top_k = 2", "top_k = 5"),
    "typo_key.toml": "batchsize = 4\n" + GOOD_LAYER,
    "partial.toml": "[layer]\nmodel_dim = 16\n",
    "cf_nan.toml": "capacity_factor = nan\n" + GOOD_LAYER,
    "huge.toml": GOOD_LAYER + "seq_len = " + "9" * 5000 + "\n",
    "base_typo.toml": 'base = "mixtral-8x7"\n',
    "suite_ok.toml": SUITE_HEAD,
    "suite_syntax.toml": SUITE_HEAD + "quartets = \n",
    "suite_field.toml": SUITE_HEAD + "quartet = 3\n",
    "suite_table.toml": SUITE_HEAD + "[suit]\nname = 'x'\n",
    "suite_system.toml": SUITE_HEAD + 'systems = ["tutle_native"]\n',
    "suite_level.toml": SUITE_HEAD + 'level = "layr"\n',
    "suite_mode.toml": SUITE_HEAD + 'mode = "trian"\n',
    "suite_routing.toml": SUITE_HEAD + 'routing = "balancd"\n',
    "suite_dtype.toml": SUITE_HEAD + 'dtype = "float16"\n',
    "suite_flavor.toml": SUITE_HEAD.replace('flavor = "debug"', 'flavor = "debg"'),
    "suite_workload.toml": SUITE_HEAD.replace('"mixtral-8x7b"', '"mixtral-8x7"'),
    "suite_model_zipf.toml": SUITE_HEAD + 'level = "model"\nrouting = "zipf"\n',
    "suite_cf.toml": SUITE_HEAD + "capacity_factor = nan\n",
    "suite_budget.toml": SUITE_HEAD.replace('name = "t"\n', 'name = "t"\nbudget_s = inf\n', 1),
    "suite_override.toml": SUITE_HEAD + "[benchmark.overrides]\nexpert = 4\n",
    "suite_top_k.toml": SUITE_HEAD + "[benchmark.overrides]\ntop_k = 9\n",
    "suite_config.toml": '[[benchmark]]\nname = "c"\nworkload = "custom"\nconfig = "top_k.toml"\nflavor = "proxy"\n',
    "suite_partial.toml": '[suite]\nname = "t"\n',
    "broken.json": '{"schema": "moebench.results",\n',
}


def _run(*argv: str) -> list[str]:
    return ["run", "--flavor", "debug", *argv]


# (id, argv, fragment of the one error line). {d} is the directory holding FILES.
BAD_INPUTS = [
    # unknown names, with the closest valid ones
    ("run system", _run("--systems", "tutle_native"),
     "unknown system 'tutle_native'; did you mean tutel_native or fsmoe_native?"),
    ("run no system", _run("--systems", ","), "names no system"),
    ("run workload", ["run", "--workload", "mixtrl-8x7b"], "did you mean mixtral-8x7b"),
    ("run flavour", ["run", "--flavor", "prxy"], "unknown flavor 'prxy'; did you mean proxy?"),
    ("run level", _run("--level", "modle"), "unknown level 'modle'; did you mean model?"),
    ("run mode", _run("--mode", "forwad"), "unknown mode 'forwad'; did you mean forward?"),
    ("run routing", _run("--routing", "zipff"), "unknown routing 'zipff'; did you mean zipf?"),
    ("run dtype", _run("--dtype", "bfloat"), "unknown dtype 'bfloat'; did you mean bfloat16"),
    ("run device", _run("--device", "gpu"), "unknown device 'gpu'"),
    ("run option name", _run("--option", "tutel_native.adaptive_rr=1", "--systems", "tutel_native"),
     "did you mean adaptive_r?"),
    # inconsistent knobs
    ("top-k above experts", _run("--top-k", "9"), "top_k (9) is larger than num_experts (8)"),
    ("top-k above set experts", _run("--experts", "2", "--top-k", "3"), "top_k (3) is larger than num_experts (2)"),
    ("ep does not divide world", _run("--nproc-per-node", "2", "--ep", "4"), "not divisible by ep*tp = 4"),
    ("experts vs ep", _run("--nproc-per-node", "3", "--ep", "3"), "neither divides the other"),
    ("zero ep", _run("--ep", "0"), "ep must be a positive integer"),
    ("model ignores routing", _run("--level", "model", "--routing", "zipf"), "applies at layer level only"),
    ("synthetic routing too narrow", _run("--routing", "balanced", "--model-dim", "4", "--heads", "1"),
     "needs model_dim >= num_experts"),
    # zero or negative sizes
    ("model dim 0", _run("--model-dim", "0"), "model_dim must be a positive integer, got 0"),
    ("ffn dim < 0", _run("--ffn-dim", "-8"), "ffn_dim must be a positive integer, got -8"),
    ("experts 0", _run("--experts", "0"), "num_experts must be a positive integer"),
    ("top-k 0", _run("--top-k", "0"), "top_k must be a positive integer"),
    ("batch 0", _run("--batch-size", "0"), "batch_size must be a positive integer"),
    ("seq 0", _run("--seq-len", "0"), "seq_len must be a positive integer"),
    ("layers 0", _run("--layers", "0"), "n_layers must be a positive integer"),
    ("heads 0", _run("--heads", "0"), "n_heads must be a positive integer"),
    ("kv heads 0", _run("--kv-heads", "0"), "n_kv_heads must be a positive integer"),
    ("vocab < 0", _run("--vocab", "-1"), "vocab_size must be a positive integer"),
    ("size not a number", _run("--experts", "many"), "num_experts must be an integer, got 'many'"),
    ("repeats 0", _run("--repeats", "0"), "--repeats must be at least 1"),
    ("steps 0", _run("--steps", "0"), "--steps must be at least 1"),
    ("steps not an int", _run("--steps", "five"), "invalid int value: 'five'"),
    ("timeout 0", _run("--timeout", "0"), "--timeout must be a finite positive number"),
    ("timeout < 0", _run("--timeout", "-5"), "--timeout must be a finite positive number"),
    ("nproc 0", _run("--nproc-per-node", "0"), "nproc-per-node must be a positive integer"),
    ("threads 0", _run("--threads-per-rank", "0"), "threads-per-rank must be a positive integer"),
    ("multi-node without endpoint", _run("--nnodes", "2"), "needs --rdzv-endpoint"),
    # capacity factor; NaN and inf
    ("capacity not a number", _run("--capacity-factor", "lots"), "capacity_factor must be a positive number"),
    ("capacity 0", _run("--capacity-factor", "0"), "capacity_factor must be a positive number"),
    ("capacity < 0", _run("--capacity-factor", "-1.5"), "capacity_factor must be a positive number"),
    ("capacity nan", _run("--capacity-factor", "nan"), "got nan"),
    ("capacity inf", _run("--capacity-factor", "inf"), "got inf"),
    ("timeout nan", _run("--timeout", "nan"), "got nan"),
    ("timeout inf", _run("--timeout", "inf"), "got inf"),
    ("seed out of range", _run("--seed", str(2**70)), "seed must be an integer in"),
    # workload files: file, line, field
    ("config missing", _run("--config", "{d}/nope.toml"), "config file {d}/nope.toml does not exist"),
    ("config syntax", _run("--config", "{d}/syntax.toml"), "{d}/syntax.toml:2: invalid TOML"),
    ("config bad value", _run("--config", "{d}/bad_value.toml"), "{d}/bad_value.toml:3: layer.ffn_dim must be an"),
    ("config top-k", _run("--config", "{d}/top_k.toml"), "{d}/top_k.toml:5: top_k (5) is larger than"),
    ("config key typo", _run("--config", "{d}/typo_key.toml"), "{d}/typo_key.toml:1: unknown key 'batchsize'; "
                                                                "did you mean batch_size"),
    ("config partial", _run("--config", "{d}/partial.toml"), "{d}/partial.toml:1: a custom workload needs"),
    ("config nan", _run("--config", "{d}/cf_nan.toml"), "{d}/cf_nan.toml:1: capacity_factor must be a positive"),
    ("config huge number", _run("--config", "{d}/huge.toml"), "{d}/huge.toml: invalid TOML in workload config"),
    ("config base typo", _run("--config", "{d}/base_typo.toml"), "{d}/base_typo.toml:1: unknown workload "
                                                                  "'mixtral-8x7'; did you mean mixtral-8x7b"),
    ("config and workload", _run("--config", "{d}/ok.toml", "--workload", "mixtral-8x7b"), "put base ="),
    ("workload twice", _run("--workload", "mixtral-8x7b,mixtral-8x7b"), "workload given twice"),
    ("plugin file missing", _run("--system-plugin", "{d}/nope.py"), "--system-plugin: plugin file"),
    # check, list, comm
    ("check system", ["check", "--systems", "torch_refrence"], "did you mean torch_reference?"),
    ("check case", ["check", "--cases", "top1-gelu-cf1-fp33"], "did you mean top1-gelu-cf1-fp32"),
    ("check plugin", ["check", "--system-plugin", "no_such_module:Cls"], "cannot import plugin module"),
    ("list plugin", ["list", "--system-plugin", "{d}/nope.py"], "plugin file {d}/nope.py does not exist"),
    ("list flag", ["list", "--bogus"], "unrecognized arguments: --bogus"),
    ("comm collective", ["comm", "--ops", "all_reduc"], "unknown collective 'all_reduc'; did you mean all_reduce?"),
    ("comm size", ["comm", "--sizes", "4Q"], "message size must be a positive number"),
    ("comm iters", ["comm", "--iters", "0"], "--iters must be positive"),
    ("comm timeout", ["comm", "--timeout", "inf"], "--timeout must be a finite positive number"),
    ("comm device", ["comm", "--device", "cudaa"], "did you mean cuda?"),
    ("comm ranks", ["comm", "--nproc-per-node", "1"], "at least 2 ranks"),
    # gate and baseline: suite files
    ("gate missing", ["gate", "{d}/nope.toml"], "suite file {d}/nope.toml does not exist"),
    ("gate syntax", ["gate", "{d}/suite_syntax.toml"], "{d}/suite_syntax.toml:8: not valid TOML"),
    ("gate field", ["gate", "{d}/suite_field.toml"], ":8: benchmark 'a' field 'quartet': unknown field 'quartet'; "
                                                      "did you mean quartets?"),
    ("gate table", ["gate", "{d}/suite_table.toml"], ":8: unknown table or field 'suit'; did you mean suite?"),
    ("gate system", ["gate", "{d}/suite_system.toml"], ":8: benchmark 'a' field 'systems': unknown system "
                                                        "'tutle_native'; did you mean tutel_native or fsmoe_native?"),
    ("gate level", ["gate", "{d}/suite_level.toml"], "field 'level': unknown level 'layr'; did you mean layer?"),
    ("gate mode", ["gate", "{d}/suite_mode.toml"], "field 'mode': unknown mode 'trian'; did you mean train?"),
    ("gate routing", ["gate", "{d}/suite_routing.toml"], "did you mean balanced?"),
    ("gate dtype", ["gate", "{d}/suite_dtype.toml"], "field 'dtype': unknown dtype 'float16'"),
    ("gate flavour", ["gate", "{d}/suite_flavor.toml"], ":7: benchmark 'a' field 'flavor': unknown flavor 'debg'"),
    ("gate workload", ["gate", "{d}/suite_workload.toml"], ":6: benchmark 'a' field 'workload': unknown workload"),
    ("gate model routing", ["gate", "{d}/suite_model_zipf.toml"], "field 'routing': zipf applies at layer level"),
    ("gate capacity nan", ["gate", "{d}/suite_cf.toml"], ":8: benchmark 'a' field 'capacity_factor': must be a "
                                                          "positive number"),
    ("gate budget inf", ["gate", "{d}/suite_budget.toml"], ":3: [suite] field 'budget_s': must be a finite number"),
    ("gate override name", ["gate", "{d}/suite_override.toml"], ":9: benchmark 'a' field 'overrides.expert': "
                                                                 "unknown override 'expert'; did you mean experts?"),
    ("gate override value", ["gate", "{d}/suite_top_k.toml"], ":9: benchmark 'a' field 'overrides.top_k': top_k (9)"),
    ("gate workload file", ["gate", "{d}/suite_config.toml"], "field 'config': {d}/top_k.toml:5: top_k (5)"),
    ("gate no benchmark", ["gate", "{d}/suite_partial.toml"], "at least one [[benchmark]] table"),
    ("gate --budget", ["gate", "{d}/suite_ok.toml", "--budget", "nan"], "--budget must be a finite positive"),
    ("baseline missing", ["baseline", "{d}/nope.toml"], "suite file {d}/nope.toml does not exist"),
    ("baseline rounds", ["baseline", "{d}/suite_ok.toml", "--rounds", "2"], "--rounds must be at least 3"),
    # report, convert, convert-checkpoint
    ("report missing", ["report", "{d}/nothing-here"], "no results found: {d}/nothing-here does not exist"),
    ("report broken", ["report", "{d}/broken.json", "--out", "{d}/reports"], "{d}/broken.json is not valid JSON"),
    ("convert missing", ["convert", "{d}/nope.json", "{d}/out.json"], "{d}/nope.json does not exist"),
    ("convert broken", ["convert", "{d}/broken.json", "{d}/out.json"], "{d}/broken.json is not valid JSON"),
    ("checkpoint world", ["convert-checkpoint", "--in", "{d}/a.pt", "--world-size", "0", "--out", "{d}/ck"],
     "--world-size must be positive"),
    ("checkpoint missing", ["convert-checkpoint", "--in", "{d}/a.pt", "--world-size", "1", "--out", "{d}/ck"],
     "input file {d}/a.pt does not exist"),
]
# These also run as real processes: the exit code as a shell sees it.
END_TO_END = ("run system", "gate field")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bad-inputs")
    for name, text in FILES.items():
        (directory / name).write_text(text)
    return directory


def _fill(parts: list[str] | str, directory: Path):
    if isinstance(parts, str):
        return parts.replace("{d}", str(directory))
    return [p.replace("{d}", str(directory)) for p in parts]


def _assert_one_line(code: int, err: str, fragment: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("moebench") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv, fragment", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, files, capsys):
    try:
        code = main(_fill(argv, files))
    except SystemExit as exc:  # argparse's own errors exit from inside the parser
        code = exc.code
    _assert_one_line(code, capsys.readouterr().err, _fill(fragment, files))


def test_bad_input_exit_code_end_to_end(files):
    rows = {name: (argv, fragment) for name, argv, fragment in BAD_INPUTS if name in END_TO_END}
    assert set(rows) == set(END_TO_END)
    procs = {name: subprocess.Popen([sys.executable, "-m", "harness", *_fill(argv, files)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in rows.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        _assert_one_line(proc.returncode, err, _fill(rows[name][1], files))


@pytest.mark.parametrize("error", [ValueError("a plain ValueError"), KeyError("missing_key")])
def test_a_bug_is_an_internal_error_not_bad_input(error, monkeypatch, capsys):
    from harness.commands import list as list_command

    def broken(args):
        raise error

    monkeypatch.setattr(list_command, "run", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1] == (f"moebench list: internal error (a bug in moebench, not in your input): "
                                    f"{type(error).__name__}: {error}")


def test_an_input_error_from_deep_inside_is_still_bad_input(monkeypatch, capsys):
    """InputError is the contract, wherever it is raised: here from the value types in core/."""
    from core.values import LayerShape
    from harness.commands import list as list_command

    monkeypatch.setattr(list_command, "run", lambda args: LayerShape(8, 8, 2, 3).validate())
    assert main(["list"]) == 2
    _assert_one_line(2, capsys.readouterr().err, "moebench list: error: top_k (3) is larger than num_experts (2)")


def test_closest_names_helper():
    from core.names import unknown_name_message

    assert unknown_name_message("system", "tutle_native", ["torch_reference", "tutel_native", "tutel"]) == (
        "unknown system 'tutle_native'; did you mean tutel_native? "
        "(choose from torch_reference, tutel_native, tutel)")
    assert unknown_name_message("level", "Layer", ["layer", "model"]).startswith(
        "unknown level 'Layer'; did you mean layer?")
    assert unknown_name_message("workload", "gpt5", ["mixtral-8x7b"]) == (
        "unknown workload 'gpt5'; choose from mixtral-8x7b")
