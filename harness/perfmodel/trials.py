"""From the harness's trials (a spec about to run, or a record already measured) to the model's cases."""
from __future__ import annotations

from core.values import LayerShape
from harness.perfmodel.layer import SYSTEMS, LayerCase, predict_layer
from harness.perfmodel.testbed import Testbed


def rank_threads(testbed: Testbed, given: int | None, ranks_per_node: int) -> int | None:
    """Threads per rank on a CPU testbed: as given, else the testbed's cores shared by the node's ranks."""
    if given:
        return given
    cores = (testbed.fingerprint or {}).get("cores")
    return max(1, int(cores) // max(1, ranks_per_node)) if cores else None


def layer_case(system: str, shape: LayerShape, tokens: int, capacity_factor: float | None, dtype: str, ep: int,
               options: dict, threads: int | None) -> LayerCase:
    return LayerCase(system=system, tokens=tokens, model_dim=shape.model_dim, ffn_dim=shape.ffn_dim,
                     num_experts=shape.num_experts, top_k=shape.top_k, gemms_per_expert=shape.gemms_per_expert,
                     capacity_factor=capacity_factor, shared_ffn_dim=shape.shared_ffn_dim, dtype=dtype, ep=ep,
                     threads=threads, overlap_degree=options.get("overlap_degree"), tune=bool(options.get("tune")),
                     forward_degree=options.get("forward_degree"), backward_degree=options.get("backward_degree"))


def case_from_spec(spec, testbed: Testbed) -> LayerCase:
    """A TrialSpec (harness/trial_spec.py) as `moebench run` would build it."""
    p = spec.parallel
    ranks_per_node = max(1, p.world_size // max(1, p.nnodes))
    return layer_case(spec.system, spec.workload.layer, spec.workload.tokens_per_step, spec.knobs.capacity_factor,
                      spec.knobs.dtype, p.ep, spec.knobs.options, rank_threads(testbed, p.threads_per_rank, ranks_per_node))


def case_from_record(trial: dict) -> LayerCase:
    """A measured trial from a results file (its workload_spec, knobs, parallel and setup)."""
    spec = trial["workload_spec"]
    shape = LayerShape(**spec["layer"])
    parallel, knobs = trial["parallel"], trial["knobs"]
    threads = (trial.get("setup") or {}).get("threads_per_rank") or parallel.get("threads_per_rank")
    return layer_case(trial["system"], shape, spec["batch_size"] * spec["seq_len"], knobs.get("capacity_factor"),
                      knobs.get("dtype", trial.get("dtype", "float32")), parallel.get("ep", 1),
                      knobs.get("options") or {}, threads)


def predictable(trial: dict) -> bool:
    """Whether the layer model covers this trial: a layer forward+backward of a known system, fp32/bf16."""
    return (trial.get("level") == "layer" and trial.get("mode") == "forward_backward"
            and trial.get("system") in SYSTEMS and trial.get("dtype") in ("float32", "bfloat16"))


def prediction_for_record(trial: dict, testbed: Testbed) -> dict | None:
    """The `prediction` entry of a results trial (harness/results_model.py), or None where the model
    does not cover the trial."""
    if not predictable(trial):
        return None
    p = predict_layer(testbed, case_from_record(trial))
    return {"testbed": testbed.name, "model": "harness/perfmodel/layer.py", "step_s": p.total_s,
            "exposed_comm_s": p.exposed_comm_s, "phases_s": dict(p.phases_s), "degrees": dict(p.degrees)}


def layer_peak_bytes(system: str, workload, capacity_factor: float | None, dtype: str, parallel, device: str,
                     options: dict | None = None, input_pool: int | None = None, check: bool = False) -> float:
    """Per-rank peak of a layer forward+backward trial, by the memory guard's estimate: one estimator for
    `moebench predict`, the validation and the guard. check=False by default, because the measured peak
    covers the system's steps, after the equivalence check's copy is freed (harness/trial.py)."""
    from core.values import MoEKnobs
    from harness.memory_guard import estimate_peak
    from harness.trial_spec import INPUT_POOL, TrialSpec

    knobs = MoEKnobs(capacity_factor=capacity_factor, dtype=dtype, device=device, options=dict(options or {}))
    spec = TrialSpec(system, workload, "layer", "forward_backward", "learned", knobs, parallel, check=check,
                     input_pool=input_pool or INPUT_POOL)
    return estimate_peak(spec).per_rank
