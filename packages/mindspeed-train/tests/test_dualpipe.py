"""``--schedules-method dualpipev`` through the real `mindspeed train` path (``launch.train``): 4 steps,
fp32, no dropout, 4-layer models cut into 2 x PP = 4 chunks laid out in a V. The losses (1e-5) and
gradient norms (1e-4) must be those of PP=1 in one process from the same start (``--load INIT
--finetune``, as the PP=2 test of test_loop.py): a qwen2 with untied embeddings (with per-token loss
and evaluation, the forward-only pass), a llama with tied ones (both copies on pipeline rank 0), with
and without ``--dualpipev-dw-detach``, DP=2 x PP=2 (distributed optimizer), TP=2 (sequence
parallel) x PP=2 and CP=2 x PP=2 (ring with the llama, ulysses with the DeepSeek model) on 4 ranks.
A torch_dist checkpoint written by a DualPipeV run resumes the same curve. The V itself: rank r holds layers r+1 and 4-r.

MoE and MTP: a DeepSeek-V3-style model (MLA, dense layer 1 then MoE with a sigmoid router, expert
bias and a shared expert, one MTP layer whose embedding copy sits in the last chunk on rank 0) with
``--dualpipev-dw-detach`` and evaluation logs the losses, grad norms and ``mtp_1 loss`` of PP=1 and
ends with its parameters and router expert biases (updated by megatron's finalize_model_grads); a
qwen3_moe with the load-balancing aux loss, tied embeddings and per-token loss logs the
``load_balancing_loss`` of PP=1 (megatron's aux-loss gradient scale).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(450), pytest.mark.slow]
PP2 = ("--pipeline-model-parallel-size", "2")


def _write_llama(root: str) -> None:
    """A 4-layer llama with tied input/output embeddings."""
    path = os.path.join(root, "llama")
    os.makedirs(path, exist_ok=True)
    config = dict(model_type="llama", vocab_size=th.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  eos_token_id=th.EOS, tie_word_embeddings=True, attention_dropout=0.0)  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)


def _write_qwen3_moe(root: str) -> None:
    """A 4-layer qwen3_moe (4 experts top-2, load-balancing aux loss 0.01) with tied embeddings."""
    path = os.path.join(root, "qmoe")
    os.makedirs(path, exist_ok=True)
    config = dict(model_type="qwen3_moe", vocab_size=th.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rms_norm_eps=1e-6, eos_token_id=th.EOS, tie_word_embeddings=True, attention_dropout=0.0, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.01)  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)


def _flags(dw_detach: bool) -> list[str]:
    return ["--schedules-method", "dualpipev", *(["--dualpipev-dw-detach"] if dw_detach else [])]


def _config(argv: list[str], dw_detach: bool = False):
    from mindspeed_train.launch import build_config

    return build_config([*argv, *_flags(dw_detach)])


def _train(argv: list[str], dw_detach: bool = False) -> None:
    """``launch.train`` with ``--schedules-method dualpipev [--dualpipev-dw-detach]``."""
    from mindspeed_train import launch

    launch.train([*argv, *_flags(dw_detach)])


# the untied runs also check the per-token loss and evaluation (DualPipeV's forward-only pass)
EXTRA = {"deep": ("--calculate-per-token-loss", "--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "2"),
         "llama": (), "deepseek": ("--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "1"),
         "qmoe": ("--calculate-per-token-loss",)}  # fmt: skip


def _init(root: str, model: str) -> tuple[str, ...]:
    return ("--load", os.path.join(root, f"init_{model}"), "--finetune", *EXTRA[model])


def _reference_world(rank: int, root: str) -> None:
    from mindspeed_train.launch import train

    for model in ("deep", "llama", "qmoe", "deepseek"):
        init = os.path.join(root, f"init_{model}")
        train(th.flags(root, init, iters=1, model=model, extra=("--save", init)))
        save = ("--save", os.path.join(root, "ref_deepseek_ck")) if model == "deepseek" else ()
        train(th.flags(root, os.path.join(root, f"ref_{model}"), model=model, extra=(*_init(root, model), *save)))
    train(th.flags(root, os.path.join(root, "ref_llama_gb8"), model="llama", global_batch=8, extra=_init(root, "llama")))


def _check_placement(rank: int, root: str) -> None:
    """Rank r's chunks hold global layers r+1 and 4-r (megatron's 1-based layer numbers, which also
    key the torch_dist checkpoint); the embedding and the output layer are both on rank 0."""
    from mindspeed_train import loop

    config = _config(th.flags(root, os.path.join(root, "placement"), model="llama", extra=PP2))
    loop.init_parallel(config)
    job = loop.build_job(config)
    models = [chunk.module for chunk in job.chunks]
    assert [[layer.layer_number for layer in m.decoder.layers] for m in models] == [[rank + 1], [4 - rank]]
    assert [(m.pre_process, m.post_process) for m in models] == [(rank == 0, False), (False, rank == 0)]
    qkv = [m.sharded_state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"] for m in models]
    assert [(t.key, t.global_offset[0]) for t in qkv] == [("decoder.layers.self_attention.linear_qkv.weight", rank),
                                                         ("decoder.layers.self_attention.linear_qkv.weight", 3 - rank)]
    assert len(job.linears) == (9 if rank == 0 else 8)  # qkv, proj, fc1, fc2 per layer (+ the output layer)
    if rank == 0:  # tied: the output copy starts as the embedding
        assert models[1].output_layer.weight.equal(models[0].embedding.word_embeddings.weight)


def _pair_world(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    _check_placement(rank, root)
    _train(th.flags(root, os.path.join(root, "v_deep"), model="deep", extra=(*PP2, *_init(root, "deep"))))
    assert ps.get_pipeline_model_parallel_world_size() == 2 and ps.get_virtual_pipeline_model_parallel_world_size() == 2
    _train(th.flags(root, os.path.join(root, "v_llama"), model="llama", extra=(*PP2, *_init(root, "llama"))))
    _train(th.flags(root, os.path.join(root, "v_qmoe"), model="qmoe", extra=(*PP2, *_init(root, "qmoe"))))
    save = ("--save", os.path.join(root, "v_deepseek_ck"))
    _train(th.flags(root, os.path.join(root, "v_deepseek"), model="deepseek", extra=(*PP2, *_init(root, "deepseek"), *save)),
           dw_detach=True)  # fmt: skip
    ck = os.path.join(root, "v_ck")
    _train(th.flags(root, os.path.join(root, "v_llama_dw"), model="llama",
                    extra=(*PP2, *_init(root, "llama"), "--save", ck, "--save-interval", "2")), dw_detach=True)  # fmt: skip
    if rank == 0:  # resume from the step-2 checkpoint (the tracker names the newest, 4)
        with open(os.path.join(ck, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write("2")
    import torch.distributed as dist

    dist.barrier()
    _train(th.flags(root, os.path.join(root, "v_llama_resumed"), model="llama", extra=(*PP2, "--load", ck)), dw_detach=True)


def _quad_world(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    extra = (*PP2, *_init(root, "llama"), "--use-distributed-optimizer")
    _train(th.flags(root, os.path.join(root, "v_dp2"), model="llama", global_batch=8, extra=extra), dw_detach=True)
    assert (ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 2)
    extra = (*PP2, *_init(root, "llama"), "--tensor-model-parallel-size", "2", "--sequence-parallel")
    _train(th.flags(root, os.path.join(root, "v_tp2"), model="llama", extra=extra), dw_detach=True)
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 1)
    cp2 = ("--context-parallel-size", "2", "--use-mcore-models", "--context-parallel-algo")
    _train(th.flags(root, os.path.join(root, "v_cp2"), model="llama",
                    extra=(*PP2, *_init(root, "llama"), *cp2, "megatron_cp_algo")), dw_detach=True)  # fmt: skip
    assert (ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 1)
    _train(th.flags(root, os.path.join(root, "v_cp2_deepseek"), model="deepseek",
                    extra=(*PP2, *_init(root, "deepseek"), *cp2, "ulysses_cp_algo")))  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("dualpipe"))
    th.write_corpus(path)
    th.write_model(path, name="deep", layers=4)
    _write_llama(path)
    th.write_deepseek(path, layers=4)
    _write_qwen3_moe(path)
    run_world(_reference_world, 1, path, timeout_s=120)
    run_world(_pair_world, 2, path, timeout_s=150)
    run_world(_quad_world, 4, path, timeout_s=300)
    return path


def test_dualpipev_untied_equals_pp1(root):
    ref = th.read(os.path.join(root, "ref_deep"))
    assert ref[0]["loss"] != ref[-1]["loss"], "the parameters must change between steps"
    assert [r["eval_loss"] is not None for r in ref] == [False, True, False, True]
    th.assert_same_run(th.read(os.path.join(root, "v_deep")), ref)


def test_dualpipev_tied_embeddings_equal_pp1(root):
    th.assert_same_run(th.read(os.path.join(root, "v_llama")), th.read(os.path.join(root, "ref_llama")))


def test_dw_detach_equals_pp1(root):
    th.assert_same_run(th.read(os.path.join(root, "v_llama_dw")), th.read(os.path.join(root, "ref_llama")))


def _checkpoint_tensors(path: str) -> dict:
    """Every tensor of a torch_dist checkpoint directory, whole (read in this one process)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata.items()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state


def test_deepseek_mla_moe_mtp_equals_pp1(root):
    ref = th.read(os.path.join(root, "ref_deepseek"))
    assert set(ref[0]["aux"]) == {"mtp_1 loss"}, ref[0]["aux"]
    assert [r["eval_loss"] is not None for r in ref] == [False, True, False, True]
    th.assert_same_run(th.read(os.path.join(root, "v_deepseek")), ref)


def test_deepseek_parameters_and_expert_bias_equal_pp1(root):
    import torch

    want = _checkpoint_tensors(os.path.join(root, "ref_deepseek_ck", "iter_0000004"))
    got = _checkpoint_tensors(os.path.join(root, "v_deepseek_ck", "iter_0000004"))
    model = sorted(k for k in want if not k.startswith("optimizer."))
    assert model == sorted(k for k in got if not k.startswith("optimizer."))
    assert "mtp.layers.0.eh_proj.weight" in model and "embedding.word_embeddings.weight" in model
    biases = [k for k in model if k.endswith("router.expert_bias")]
    assert len(biases) == 4  # MoE layers 2-4 and the MTP layer's
    for key in biases:  # integer token counts -> the same sign-step updates, bit for bit
        assert want[key].abs().sum() > 0 and torch.equal(got[key], want[key]), key
    for key in model:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


def test_moe_aux_loss_per_token_tied_equals_pp1(root):
    ref = th.read(os.path.join(root, "ref_qmoe"))
    assert set(ref[0]["aux"]) == {"load_balancing_loss"}, ref[0]["aux"]
    th.assert_same_run(th.read(os.path.join(root, "v_qmoe")), ref)


def test_dp2_x_dualpipev_pp2_equals_pp1(root):
    th.assert_same_run(th.read(os.path.join(root, "v_dp2")), th.read(os.path.join(root, "ref_llama_gb8")))


def test_tp2_sequence_parallel_x_dualpipev_pp2_equals_pp1(root):
    th.assert_same_run(th.read(os.path.join(root, "v_tp2")), th.read(os.path.join(root, "ref_llama")))


def test_context_parallel_x_dualpipev_pp2_equals_pp1(root):
    """CP=2 inside the V: ring with the tied llama, ulysses with DeepSeek (MLA, MoE, MTP; eval too)."""
    th.assert_same_run(th.read(os.path.join(root, "v_cp2")), th.read(os.path.join(root, "ref_llama")))
    th.assert_same_run(th.read(os.path.join(root, "v_cp2_deepseek")), th.read(os.path.join(root, "ref_deepseek")))


def test_dualpipev_checkpoint_resumes_the_same_curve(root):
    run, resumed = th.read(os.path.join(root, "v_llama_dw")), th.read(os.path.join(root, "v_llama_resumed"))
    assert [r["iteration"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, run[2:], strict=True):
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-7), (key, got, want)


def _base_config(root: str, **parallel):
    from mindspeed_train.launch import build_config

    config = build_config(th.flags(root, os.path.join(root, "unused"), model="llama"))
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, schedule="dualpipev", **parallel))


@pytest.mark.parametrize("change, message", [
    (dict(pipeline=1), "needs --pipeline-model-parallel-size >= 2"),
    (dict(pipeline=2, virtual=2), "drop --num-layers-per-virtual-pipeline-stage"),
    (dict(pipeline=4), "needs >= 2 x PP = 8 micro-batches per step, got 4"),
])  # fmt: skip
def test_unsupported_layouts_are_clear_errors(tmp_path, change, message):
    from mindspeed_train import dualpipe

    th.write_corpus(str(tmp_path))
    _write_llama(str(tmp_path))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        dualpipe.check_config(_base_config(str(tmp_path), **change))


def test_packed_batches_and_legacy_checkpoints_are_clear_errors(tmp_path):
    from mindspeed_train import dualpipe

    th.write_corpus(str(tmp_path))
    _write_llama(str(tmp_path))
    config = _base_config(str(tmp_path), pipeline=2)
    with pytest.raises(ValueError, match="packed"):
        dualpipe.check_config(dataclasses.replace(config, data=dataclasses.replace(config.data, packed=True)))
    legacy = dataclasses.replace(config.ckpt, format="torch", save=str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="--ckpt-format torch"):
        dualpipe.check_config(dataclasses.replace(config, ckpt=legacy))


def test_layers_must_split_into_2pp_chunks(tmp_path):
    import torch

    import mindspeed_models as mm
    from mindspeed_train import dualpipe

    th.write_model(str(tmp_path), name="two", layers=2)
    spec = mm.from_hf_config(os.path.join(str(tmp_path), "two"), pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    with pytest.raises(ValueError, match="splits 2 layers into 2 x PP = 4 chunks"):
        dualpipe.v_spec(spec)
