"""`moebench convert-checkpoint`: re-shard tutel_native checkpoints to another world size.

The input files are the per-rank state dicts of one checkpoint, in rank
order (one file means world size 1). The output directory gets
``rank{i}.pt`` for i in range(world size); world size 1 writes ``rank0.pt``
with every expert whole.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from harness.errors import UsageError, input_errors

NAME = "convert-checkpoint"
HELP = "gather/scatter tutel_native expert shards between world sizes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
                        help="per-rank state dict files, in rank order")
    parser.add_argument("--world-size", type=int, required=True, help="world size of the converted checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for rank{i}.pt files")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help="expert hidden size (only needed for sharded llama_ffn when it cannot be inferred)")


def _load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"input file {path} does not exist")
    import torch  # here, not at the top: building the CLI's parser must not import torch

    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UsageError(f"cannot read {path} as a torch state dict: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is not a state dict of tensors")
    return state


def run(args: argparse.Namespace) -> int:
    import torch

    from systems.tutel_native import checkpoint

    if args.world_size <= 0:
        raise UsageError(f"--world-size must be positive, got {args.world_size}")
    if args.hidden_size is not None and args.hidden_size <= 0:
        raise UsageError(f"--hidden-size must be positive, got {args.hidden_size}")
    states = [_load(path) for path in args.inputs]
    with input_errors():  # checkpoint.py says what does not fit in the input files as a ValueError
        converted = checkpoint.convert(states, args.world_size, hidden_size=args.hidden_size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for rank, state in enumerate(converted):
        torch.save(state, out / f"rank{rank}.pt")
    last = args.world_size - 1
    print(f"converted {len(states)} rank file(s) to world size {args.world_size}: {out}/rank0..{last}.pt")
    return 0
