"""tutel_native checkpoints: shard layouts, gather/scatter round trips, the
convert-checkpoint command, and a world-size-2 checkpoint loaded at world size 1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from harness.cli import main as cli_main
from systems.tutel_native import checkpoint
from systems.tutel_native.layer import MoELayer
from tests.test_tutel_native_distributed import spawn

M, H = 8, 16
FFN = {"type": "ffn", "hidden_size_per_expert": H, "output_dim": 6}
LLAMA = {"type": "llama_ffn", "hidden_size_per_expert": H}


def world1_state(experts: dict, num_experts: int) -> dict:
    torch.manual_seed(0)
    layer = MoELayer({"type": "top", "k": 1}, M, {**experts, "num_experts_per_device": num_experts})
    return layer.state_dict()


@pytest.mark.parametrize("experts", [FFN, LLAMA], ids=["ffn", "llama_ffn"])
@pytest.mark.parametrize("num_experts,world", [(2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (2, 8)])
def test_scatter_then_gather_is_identity(experts, num_experts, world):
    full = world1_state(experts, num_experts)
    ranks = checkpoint.scatter(full, world)
    assert len(ranks) == world
    n, sc = checkpoint.layout(num_experts, world)
    for state in ranks:  # shapes a layer built at this world size holds
        if experts is FFN:
            assert state["experts.batched_fc1_w"].shape == (n, H // sc, M)
            assert state["experts.batched_fc2_w"].shape == (n, H // sc, 6)
            assert state["experts.batched_fc2_bias"].shape == (n, math.ceil(6 / sc))
        else:
            assert state["experts.W_fc3"].shape == (math.ceil(n * M * H / sc),)
        assert torch.equal(state["gates.0.wg.weight"], full["gates.0.wg.weight"])
    back = checkpoint.gather(ranks)
    assert set(back) == set(full)
    for key, value in full.items():
        assert torch.equal(back[key], value), key


def test_sharded_llama_slices_are_flat_slices_of_each_expert():
    full = world1_state(LLAMA, 2)
    ranks = checkpoint.scatter(full, 4)  # sc = 2: rank 3 holds the second half of expert 1
    per_expert = M * H
    expert1 = full["experts.W_fc1"][per_expert:]
    assert torch.equal(ranks[3]["experts.W_fc1"], expert1[per_expert // 2 :])


def test_num_global_experts_is_checked():
    full = world1_state(FFN, 2)
    a, b = checkpoint.scatter(full, 2)
    b = dict(b, _num_global_experts=torch.tensor(4))
    with pytest.raises(ValueError, match="_num_global_experts differs"):
        checkpoint.gather([a, b])
    with pytest.raises(ValueError, match="evenly"):
        checkpoint.scatter(full, 3)
    with pytest.raises(ValueError, match="not a world-size-1"):
        checkpoint.scatter(a, 2)
    wrong = MoELayer({"type": "top", "k": 1}, M, {**FFN, "num_experts_per_device": 4})
    with pytest.raises(RuntimeError, match="_num_global_experts"):
        wrong.load_state_dict(full)


def _save_rank(rank, world, experts, k, out_dir):
    layer = MoELayer({"type": "top", "k": k}, M, dict(experts), seeds=(1, 2, 3))
    x = torch.randn(24, M, generator=torch.Generator().manual_seed(rank))
    y = layer(x, capacity_factor=0.0)
    torch.save(layer.state_dict(), f"{out_dir}/rank{rank}.pt")
    torch.save({"x": x, "y": y.detach()}, f"{out_dir}/io{rank}.pt")
    dist.barrier()


@pytest.mark.parametrize(
    "experts,k",
    [({**FFN, "num_experts_per_device": 1}, 2), ({**LLAMA, "num_experts_per_device": -2}, 1)],
    ids=["ffn-expert-parallel", "llama-sharded"],
)
def test_world2_checkpoint_converted_loads_at_world1(tmp_path, experts, k, capsys):
    spawn(_save_rank, 2, experts, k, str(tmp_path))
    files = [str(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert cli_main(["convert-checkpoint", "--in", *files, "--world-size", "1", "--out", str(tmp_path / "w1")]) == 0
    E = int(torch.load(files[0])["_num_global_experts"])
    single = MoELayer({"type": "top", "k": k}, M, {**experts, "num_experts_per_device": E})
    single.load_state_dict(torch.load(tmp_path / "w1" / "rank0.pt"))
    for rank in range(2):
        io = torch.load(tmp_path / f"io{rank}.pt")
        torch.testing.assert_close(single(io["x"], capacity_factor=0.0).detach(), io["y"], atol=1e-6, rtol=1e-5)
    # and back to world size 2: the original shards, exactly
    out2 = tmp_path / "w2"
    assert cli_main(["convert-checkpoint", "--in", str(tmp_path / "w1" / "rank0.pt"), "--world-size", "2",
                     "--out", str(out2)]) == 0
    for rank in range(2):
        original, again = torch.load(files[rank]), torch.load(out2 / f"rank{rank}.pt")
        assert set(original) == set(again)
        for key in original:
            assert torch.equal(original[key], again[key]), key


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert cli_main(["convert-checkpoint", "--in", str(tmp_path / "nope.pt"), "--world-size", "2",
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    torch.save(world1_state(FFN, 2), tmp_path / "full.pt")
    assert cli_main(["convert-checkpoint", "--in", str(tmp_path / "full.pt"), "--world-size", "3",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "evenly" in err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert cli_main(["convert-checkpoint", "--in", str(tmp_path / "junk.pt"), "--world-size", "1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
