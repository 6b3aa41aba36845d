"""Legacy checkpoints (``--ckpt-format torch``) through the real `mindspeed train` path on 2 gloo ranks.

Resume: DP=2 with the distributed optimizer in bf16 (``distrib_optim.pt`` holds the fp32 main
parameters and Adam moments), TP=2, PP=2, and MoE with EP=2 plus the distributed optimizer. A 4-step
run saves at step 2 and is killed inside the save of step 4 after its files are written, before the
rename; resuming from step 2 must reproduce steps 3-4 exactly. The layout is megatron's
(``mp_rank_TT[_PPP][_EEE]``), and ``mindspeed convert mcore-to-hf`` turns the trained checkpoint into an
HF model whose transformers logits equal the trained megatron model's (captured at the save).

Conversion: an HF model converted by ``mindspeed convert hf-to-mcore`` (model only) fine-tunes with
``--finetune``; trained with lr 0 and saved legacy, it converts back bit-identical to the HF weights
(fp32; and after a detour through torch_dist, resharded to TP 1, in bf16 with the distributed
optimizer, whose fp32 main parameters must follow the loaded weights).
"""

from __future__ import annotations

import os

import pytest
import torch
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
LEGACY = ("--ckpt-format", "torch")
VARIANTS = {  # name -> (model, flags, rank directories of a checkpoint, files in the first one)
    "distopt": ("model", ("--use-distributed-optimizer", "--bf16"), ["mp_rank_00"],
                ["distrib_optim.pt", "model_optim_rng.pt"]),
    "tp2": ("model", ("--tensor-model-parallel-size", "2"), ["mp_rank_00", "mp_rank_01"], ["model_optim_rng.pt"]),
    "pp2": ("model", ("--pipeline-model-parallel-size", "2"), ["mp_rank_00_000", "mp_rank_00_001"], ["model_optim_rng.pt"]),
    "ep2": ("moe", ("--expert-model-parallel-size", "2", "--use-distributed-optimizer"), ["mp_rank_00_000", "mp_rank_00_001"],
            ["distrib_optim.pt", "model_optim_rng.pt"]),
}  # fmt: skip
WITH_LOGITS = ("tp2", "ep2")  # PP = 1 and fp32: one forward of the model gives the full logits
TOKENS = torch.randint(1, th.VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model) -> torch.Tensor:
    """The full-vocabulary logits of the (DDP-wrapped, PP = 1) megatron model on TOKENS."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    model.eval()
    try:
        with torch.no_grad():
            local = model.module(TOKENS, positions, None).contiguous()
    finally:
        model.train()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _recording_save(original, root):
    """ckpt.save_checkpoint that also stores the model's logits at the step-4 save of a WITH_LOGITS run."""

    def save(settings, chunks, *args, iteration, **kwargs):
        path = original(settings, chunks, *args, iteration=iteration, **kwargs)
        name = os.path.basename(settings.save).removesuffix("_ck")
        if iteration == 4 and name in WITH_LOGITS:
            (model,) = chunks
            logits = _logits(model)
            if torch.distributed.get_rank() == 0:
                torch.save(logits, os.path.join(root, f"{name}_logits.pt"))
        return path

    return save


def _resume_world(rank: int, root: str) -> None:
    from mindspeed_train import ckpt, ckpt_legacy
    from mindspeed_train.launch import train

    original_ckpt = ckpt.save_checkpoint
    ckpt.save_checkpoint = _recording_save(original_ckpt, root)
    for name, (model, extra, _, _) in VARIANTS.items():
        # ckpt_legacy.save(step_dir, ...): dies after writing the step-4 rank files
        th.kill_in_save_then_resume(root, name, model, (*LEGACY, *extra), ckpt_legacy, "save", path_arg=0)
    ckpt.save_checkpoint = original_ckpt
    # No --ckpt-format: the format of --load is read from its contents.
    finetune = ("--load", os.path.join(root, "pp2_ck"), "--finetune", "--pipeline-model-parallel-size", "2")
    train(th.flags(root, os.path.join(root, "finetune"), iters=1, extra=finetune))


def test_killed_legacy_save_is_never_loaded_and_resume_continues_the_curve(tmp_path):
    root = str(tmp_path)
    th.prepare(root)
    run_world(_resume_world, 2, root, timeout_s=150)
    for name, (_, _, ranks, files) in VARIANTS.items():
        ck = th.check_killed_then_resumed(root, name)
        step = os.path.join(ck, "iter_0000004")
        assert sorted(os.listdir(step)) == ranks, name
        assert sorted(os.listdir(os.path.join(step, ranks[0]))) == files, name
    (finetune,) = th.read(os.path.join(root, "finetune"))
    fresh = th.read(os.path.join(root, "pp2_killed"))[0]
    assert finetune["iteration"] == 1 and finetune["consumed_samples"] == 4 and finetune["lr"] == fresh["lr"]
    assert finetune["loss"] < fresh["loss"] - 0.05, "the finetune run must start from the trained weights"
    _check_megatron_keys(os.path.join(root, "distopt_ck", "iter_0000004", "mp_rank_00", "model_optim_rng.pt"))
    for name in WITH_LOGITS:
        _check_export(root, name)


def _check_megatron_keys(path: str) -> None:
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, weights_only=True)  # what mindspeed convert reads: no arbitrary pickles
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 4 and state["consumed_samples"] == 16
    args = state["args"]
    assert (args.consumed_train_samples, args.tensor_model_parallel_size, args.data_parallel_size) == (16, 1, 2)
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(state)
    assert len(state["rng_state"]) == 2 and "rng_tracker_states" in state["rng_state"][0]


def _check_export(root: str, name: str) -> None:
    """mcore-to-hf of the trained checkpoint; transformers' logits equal the trained model's."""
    transformers = pytest.importorskip("transformers")
    from mindspeed_ckpt.convert import mcore_to_hf

    out = mcore_to_hf(os.path.join(root, f"{name}_ck"), os.path.join(root, f"{name}_hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(TOKENS).logits
    got = torch.load(os.path.join(root, f"{name}_logits.pt"))
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    print(f"{name}: mcore-to-hf export vs trained model, max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, name
    assert torch.equal(got.argmax(-1), want.argmax(-1)), name


def _lr0(flags: list[str]) -> list[str]:
    # lr 0 (and min lr 0): the step changes nothing, so the saved weights are the loaded ones
    out = list(flags)
    for flag in ("--lr", "--min-lr"):
        out[out.index(flag) + 1] = "0.0"
    return out


def _convert_world(rank: int, root: str) -> None:
    from mindspeed_train.launch import train

    extra = ("--load", os.path.join(root, "converted"), "--finetune", "--tensor-model-parallel-size", "2",
             "--save", os.path.join(root, "ft_ck"), *LEGACY)  # fmt: skip
    train(_lr0(th.flags(root, os.path.join(root, "ft"), iters=1, extra=extra)))
    # Legacy -> torch_dist, then torch_dist (resharded to TP 1 x DP 2) -> legacy in bf16: the optimizer's
    # fp32 main parameters must follow the loaded weights (megatron's reload_model_params), or the step
    # would write the random initial weights back into the model.
    to_dist = ("--load", os.path.join(root, "ft_ck"), "--finetune", "--tensor-model-parallel-size", "2",
               "--save", os.path.join(root, "ft_dist_ck"))  # fmt: skip
    train(_lr0(th.flags(root, os.path.join(root, "ft_dist"), iters=1, extra=to_dist)))
    bf16 = ("--load", os.path.join(root, "ft_dist_ck"), "--finetune", "--save", os.path.join(root, "ft_bf16_ck"),
            "--bf16", "--use-distributed-optimizer", *LEGACY)  # fmt: skip
    train(_lr0(th.flags(root, os.path.join(root, "ft_bf16"), iters=1, extra=bf16)))
    # A converted checkpoint has no optimizer state: a plain resume says how to go on.
    resume = ("--load", os.path.join(root, "converted"), "--tensor-model-parallel-size", "2")
    try:
        train(th.flags(root, os.path.join(root, "no_optim"), iters=2, extra=resume))
        raise AssertionError("resuming a model-only checkpoint must fail")
    except ValueError as error:
        assert "--finetune" in str(error) and "--no-load-optim" in str(error)


def test_finetune_from_hf_to_mcore_and_back_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf

    root = str(tmp_path)
    model_dir, _ = th.prepare(root)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    hf.save_pretrained(os.path.join(root, "hf"))
    hf_to_mcore(os.path.join(root, "hf"), os.path.join(root, "converted"), tp=2)
    run_world(_convert_world, 2, root, timeout_s=120)
    (step,) = th.read(os.path.join(root, "ft"))
    assert step["lr"] == 0.0
    want = load_file(os.path.join(root, "hf", "model.safetensors"))
    for ck, dtype in (("ft_ck", torch.float32), ("ft_bf16_ck", torch.bfloat16)):
        back = mcore_to_hf(os.path.join(root, ck), os.path.join(root, f"{ck}_hf"))
        got = load_file(os.path.join(back, "model.safetensors"))
        assert sorted(got) == sorted(want)
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor.to(dtype)), (ck, key)


def test_load_refuses_a_directory_in_neither_format(tmp_path):
    from mindspeed_train import ckpt, ckpt_legacy
    from mindspeed_train.config import CheckpointSettings

    root = str(tmp_path)
    os.makedirs(os.path.join(root, "iter_0000003", "something"))
    open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w").write("3")
    settings = CheckpointSettings(save=None, save_interval=None, load=root, load_optim=True, save_optim=True,
                                  load_rng=True, save_rng=True, finetune=False)  # fmt: skip
    with pytest.raises(ValueError, match="neither a torch_dist checkpoint"):
        ckpt.load_checkpoint(settings, None, None, None)
    os.makedirs(os.path.join(root, "iter_0000003", "mp_rank_00"))
    assert ckpt_legacy.is_legacy(os.path.join(root, "iter_0000003"))
    assert not ckpt_legacy.is_legacy(os.path.join(root, "iter_0000009"))
