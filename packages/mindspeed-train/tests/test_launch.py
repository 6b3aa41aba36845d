"""`mindspeed train`'s launch validation (no process group, no megatron import): the validated
mindspeed-args config becomes a TrainConfig; bad launches stop with one line per problem."""

from __future__ import annotations

import pytest
import train_helpers as th

from mindspeed_train.launch import build_config, main, split_argv


@pytest.fixture()
def root(tmp_path) -> str:
    th.write_model(str(tmp_path))
    return str(tmp_path)


def test_config_from_validated_args(root):
    argv = th.flags(root, root, global_batch=8, micro=2) + ["--lr-warmup-fraction", "0.5"]
    argv.remove("--lr-warmup-iters"), argv.remove("1")
    cfg = build_config(argv)
    assert cfg.parallel.world == 1 and cfg.parallel.tensor == 1 and cfg.parallel.data == 1
    assert cfg.batch.num_microbatches == 4 and cfg.batch.seq_length == 16
    assert cfg.optim.lr_warmup_iters == 2  # 0.5 x lr_decay_iters 4
    assert cfg.optim.lr_decay_style == "cosine" and cfg.optim.clip_grad == 1.0 and cfg.optim.weight_decay == 0.1
    assert cfg.ckpt.save is None and cfg.ckpt.load_optim and cfg.ckpt.save_rng and not cfg.ckpt.finetune
    assert cfg.split == "100,0,0" and cfg.output_dir == root


def test_model_sizes_come_from_the_hf_config(root):
    cfg_ok = build_config(th.flags(root, root) + ["--num-layers", "2", "--hidden-size", "32"])
    assert cfg_ok.model.endswith("model")
    with pytest.raises(ValueError, match="--num-layers 3 disagrees with num_hidden_layers=2"):
        build_config(th.flags(root, root) + ["--num-layers", "3"])


def test_unimplemented_parameter_stops_the_launch(root):
    with pytest.raises(ValueError, match="return_document_ids is not implemented yet"):
        build_config(th.flags(root, root) + ["--return-document-ids"])


def test_eval_tensorboard_bf16_and_save_total_limit(root):
    plain = build_config(th.flags(root, root))
    assert plain.eval.interval is None and plain.tensorboard_dir is None and not plain.precision.bf16
    assert plain.ckpt.save_total_limit is None
    cfg = build_config(th.flags(root, root) + ["--eval-interval", "5", "--eval-iters", "3", "--tensorboard-dir", "tb",
                                               "--bf16", "--save-total-limit", "2"])  # fmt: skip
    assert (cfg.eval.interval, cfg.eval.iters, cfg.tensorboard_dir, cfg.precision.bf16) == (5, 3, "tb", True)
    assert cfg.ckpt.save_total_limit == 2
    # the schema: an unset eval_interval follows save_interval; --eval-iters 0 turns evaluation off
    assert build_config(th.flags(root, root) + ["--save", root, "--save-interval", "7"]).eval.interval == 7
    assert build_config(th.flags(root, root) + ["--eval-interval", "5", "--eval-iters", "0"]).eval.interval is None
    with pytest.raises(ValueError, match="--save-total-limit '0'"):
        build_config(th.flags(root, root) + ["--save-total-limit", "0"])


def test_bad_launches(root):
    argv = th.flags(root, root)
    with pytest.raises(ValueError, match="--model is required"):
        build_config(argv[2:])
    with pytest.raises(ValueError, match="--model /nope: no such file"):
        build_config(["--model", "/nope"] + argv[2:])
    with pytest.raises(ValueError, match="world size must be a multiple of TP x PP x CP = 2"):
        build_config(argv + ["--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match="global_batch_size must be a multiple of micro_batch_size"):
        build_config(th.flags(root, root, global_batch=3, micro=2))
    style = argv.index("--lr-decay-style") + 1
    with pytest.raises(ValueError, match="--lr-decay-style 'inverse-square-root' is not implemented"):
        build_config(argv[:style] + ["inverse-square-root"] + argv[style + 1 :])
    with pytest.raises(ValueError, match="unknown megatron flag '--no-such-flag'"):
        build_config(argv + ["--no-such-flag"])


def test_main_exits_2_with_a_one_line_reason(root, capsys):
    assert main(th.flags(root, root)[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mindspeed train: --model is required")


def test_nproc_validates_for_its_world_before_starting_torchrun(root, capsys, monkeypatch):
    from mindspeed_train import launch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launch, "_world_size", lambda: 1)  # this process's own world (or a leftover group) is not N's
    monkeypatch.setattr(launch, "_reexec_torchrun", lambda *a: pytest.fail("torchrun must not start on bad input"))
    # CP 2 fits the 2 processes --nproc asks for, but not a 30-token sequence split 2 x 2 ways
    bad = ["--nproc", "2", *th.flags(root, root, extra=("--use-mcore-models", "--context-parallel-size", "2",
                                                       "--context-parallel-algo", "megatron_cp_algo"))]  # fmt: skip
    bad[bad.index("--seq-length") + 1] = "30"
    assert launch.main(bad) == 2
    err = capsys.readouterr().err
    assert "seq_length must be a multiple of 2 x context_parallel_size = 4" in err and "Traceback" not in err
    started = []
    monkeypatch.setattr(launch, "_reexec_torchrun", lambda nproc, argv: started.append(nproc))
    monkeypatch.setattr(launch, "train", lambda argv: [])  # (what the re-executed children would run)
    bad[bad.index("--seq-length") + 1] = "32"
    assert launch.main(bad) == 0 and started == [2]


def _callers_group(rank: int, root: str) -> None:
    import torch.distributed as dist

    from mindspeed_train.launch import main

    assert dist.is_initialized()  # run_world's group: the caller's, not main's
    assert main(th.flags(root, root)[2:]) == 2
    assert dist.is_initialized(), "main() must not destroy a process group it did not create"


def test_main_leaves_a_callers_process_group_alone(root):
    from mindspeed_kernels.testing import run_world

    run_world(_callers_group, 1, root, timeout_s=60)


def test_launcher_flags_are_split_from_megatron_flags():
    ours, rest = split_argv(["--model", "m", "--nproc", "2", "--seq-length", "8", "--output-dir", "o"])
    assert (ours.model, ours.nproc, ours.output_dir) == ("m", 2, "o") and rest == ["--seq-length", "8"]


def test_help_prints_usage_and_exits_0(capsys):
    from mindspeed_train.launch import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mindspeed train") and "--nproc" in out and "--data-path" in out


def test_warmup_not_shorter_than_decay_is_a_clear_error(root):
    argv = th.flags(root, root)
    argv[argv.index("--lr-warmup-iters") + 1] = "4"  # th.flags decays over 4 iterations
    with pytest.raises(ValueError, match="LR warmup \\(4 iterations\\) must be shorter than the decay \\(4"):
        build_config(argv)
