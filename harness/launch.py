"""How a trial child is started: plain ``python -m harness.trial`` for one rank,
torchrun (``python -m torch.distributed.run``, c10d rendezvous) for several.

Multi-node: every node runs the same ``moebench run`` with its own node rank
and the same HOST:PORT. Each trial round is its own torchrun rendezvous, on
port PORT + (the round's position in the schedule), so a round can never
join the store of a previous round whose host is still shutting down; node 0
hosts each round's store (``is_host``). Single node without an endpoint: a
free port is picked per round by binding port 0 on 127.0.0.1.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from systems.distributed import free_port  # the one free-port helper (systems cannot import harness)

REPO_DIR = Path(__file__).resolve().parents[1]


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); ValueError with one line when it is not that."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous endpoint must be HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(port)


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class LaunchConfig:
    """torchrun's vocabulary: ranks per node, nodes, this node's rank, rendezvous endpoint."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT; required when nnodes > 1
    threads_per_rank: int | None = None
    python: str = sys.executable

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def uses_torchrun(self) -> bool:
        return self.world_size > 1

    def validate(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.threads_per_rank is not None and self.threads_per_rank <= 0:
            raise ValueError(f"threads-per-rank must be a positive integer, got {self.threads_per_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("a multi-node run (nnodes > 1) needs --rdzv-endpoint HOST:PORT")
        if self.rdzv_endpoint:
            parse_endpoint(self.rdzv_endpoint)

    def threads(self) -> int:
        """Threads per rank: as asked, else this machine's cores shared by its ranks."""
        return self.threads_per_rank or max(1, available_cores() // self.nproc_per_node)

    def endpoint_for(self, sequence: int) -> str:
        """The rendezvous endpoint of the `sequence`-th round of the schedule (0-based)."""
        if not self.rdzv_endpoint:
            return f"127.0.0.1:{free_port()}"
        host, port = parse_endpoint(self.rdzv_endpoint)
        return f"{host}:{port + sequence}"


def trial_command(config: LaunchConfig, spec_path: Path, out_path: Path, sequence: int,
                  timeout_s: float, module: str = "harness.trial") -> list[str]:
    """argv that runs one trial round (all local ranks of it on this node) of `module SPEC OUT`."""
    trial = ["-m", module, str(spec_path), str(out_path)]
    if not config.uses_torchrun:
        return [config.python, *trial]
    wait = max(30, int(timeout_s))
    rdzv_conf = f"join_timeout={wait},read_timeout={wait}"
    if config.nnodes > 1:
        rdzv_conf += f",is_host={int(config.node_rank == 0)}"
    return [
        config.python, "-m", "torch.distributed.run",
        "--nproc-per-node", str(config.nproc_per_node),
        "--nnodes", str(config.nnodes),
        "--node-rank", str(config.node_rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", config.endpoint_for(sequence),
        "--rdzv-id", f"moebench-{sequence}",
        "--rdzv-conf", rdzv_conf,
        "--max-restarts", "0",
        *trial,
    ]


def child_env(config: LaunchConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: OMP_NUM_THREADS = threads per rank, the repo importable."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(config.threads())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH", "")) if p)
    return env
