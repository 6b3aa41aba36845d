"""Legacy layout: rank directory names, the tracker file, and locating a checkpoint."""

import argparse

import pytest
import torch

from mindspeed_ckpt.megatron_io import args_get, chunks, load_file, locate, rank_dir, save_rank, write_tracker


def test_rank_dir_names():
    assert rank_dir(1, 0, 1) == "mp_rank_01" and rank_dir(1, 2, 4) == "mp_rank_01_002"
    # Megatron-LM's get_checkpoint_name: the EP rank is appended when EP > 1, with or without _PPP
    assert rank_dir(1, 0, 1, 3, 4) == "mp_rank_01_003" and rank_dir(0, 1, 2, 1, 2) == "mp_rank_00_001_001"


@pytest.mark.parametrize("pp,ep", [(1, 2), (2, 1), (2, 2)])
def test_locate_tells_ep_from_pp_by_the_saved_args(tmp_path, pp, ep):
    ns = argparse.Namespace(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    for p in range(pp):
        for e in range(ep):
            save_rank(tmp_path, 1, 0, p, pp, {"w": torch.tensor([p, e])}, ns, ep_rank=e, ep=ep)
    write_tracker(tmp_path, 1)
    ck = locate(tmp_path)
    assert (ck.tp, ck.pp, ck.ep) == (1, pp, ep)
    assert ck.load(0, pp - 1, ep - 1)["model"]["w"].tolist() == [pp - 1, ep - 1]


def test_vpp_files_hold_model_chunks(tmp_path):
    path = save_rank(tmp_path, 1, 0, 0, 2, [{"a": torch.zeros(1)}, {"b": torch.ones(1)}], argparse.Namespace())
    ck = load_file(path)
    assert "model" not in ck and [list(c) for c in chunks(ck)] == [["a"], ["b"]]


def test_save_locate_load(tmp_path):
    ns = argparse.Namespace(tensor_model_parallel_size=2)
    for t in range(2):
        for p in range(2):
            save_rank(tmp_path, 7, t, p, 2, {"w": torch.full((2,), float(t + 10 * p))}, ns)
    write_tracker(tmp_path, 7)
    ck = locate(tmp_path)
    assert (ck.tp, ck.pp, ck.step_dir.name) == (2, 2, "iter_0000007")
    d = ck.load(1, 1)
    assert d["iteration"] == 7 and d["checkpoint_version"] == 3.0 and d["model"]["w"].tolist() == [11.0, 11.0]
    assert args_get(d["args"], "tensor_model_parallel_size") == 2 and args_get({"a": 1}, "a") == 1


def test_release_tracker_and_bad_trackers(tmp_path):
    save_rank(tmp_path, "release", 0, 0, 1, {"w": torch.ones(1)}, argparse.Namespace())
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert locate(tmp_path).step_dir.name == "release"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("banana")
    with pytest.raises(ValueError, match="expected an iteration number"):
        locate(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ValueError, match="iter_0000005"):
        locate(tmp_path)


def test_load_file_rejects_non_checkpoints(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="'model'"):
        load_file(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="file not found"):
        load_file(tmp_path / "y.pt")
