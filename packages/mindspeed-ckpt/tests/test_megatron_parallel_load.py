"""The rank files of every parallel layout against megatron-core itself: 4 gloo ranks build
megatron's GPTModel (local spec) for their own (TP, PP, VPP chunk, EP) coordinates and load the
file megatron's naming gives those coordinates, strictly (every name, every shape). Covers MoE
with EP (local expert numbering), MLA under TP, MTP on the last stage with its embedding copy,
tied embeddings under PP, uneven PP and VPP chunks."""

import sys
from pathlib import Path

import pytest
import torch

from mindspeed_ckpt.convert import hf_to_mcore

pytest.importorskip("megatron.core")
testing = pytest.importorskip("mindspeed_kernels.testing")  # the monorepo's spawn harness, test-time only
pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

# (tiny config key, HF config overrides, converter flags, megatron TransformerConfig pipeline fields)
JOBS = [
    ("deepseek_v3", {"num_hidden_layers": 4}, {"tp": 2, "ep": 2}, {}),
    ("deepseek_v3_tied_mtp2", {"num_hidden_layers": 4}, {"pp": 2, "ep": 2}, {}),
    ("qwen2_moe", {}, {"tp": 2, "pp": 2}, {}),
    ("qwen3_moe", {"num_hidden_layers": 4}, {"pp": 2, "ep": 2, "num_layer_list": "1,3"},
     {"num_layers_in_first_pipeline_stage": 1}),
    ("llama", {"num_hidden_layers": 8}, {"tp": 2, "pp": 2, "vpp": 2}, {"virtual_pipeline_model_parallel_size": 2}),
]


def _world(rank, jobs):
    import torch.distributed as dist
    from megatron.core.transformer import multi_latent_attention

    sys.path.insert(0, str(Path(__file__).parent / "maps"))
    # megatron's CPU seams in this child: CUDA device queries, the tied-embedding .cuda() under PP,
    # and TE mocks that break MLA's isinstance checks
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *a, **k: self
    multi_latent_attention.HAVE_TE = False
    for job in jobs:
        _check(rank, *job)
        dist.barrier()


def _check(rank, mc_dir, cfg, flags, pipeline):
    from megatron.core import parallel_state as ps
    from test_mcore_names import _transformer_config

    from mindspeed_ckpt.megatron_io import FILE, chunks, rank_dir

    tp, pp, ep, vpp = (flags.get(k, 1) for k in ("tp", "pp", "ep", "vpp"))
    # expert TP 1 must be explicit: megatron defaults it to the TP size
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    try:
        t, p, e = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        ck = torch.load(Path(mc_dir) / "iter_0000001" / rank_dir(t, p, pp, e, ep) / FILE, weights_only=False)
        moe = bool(ck["args"].num_experts)
        config = _transformer_config(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                     sequence_parallel=moe and tp > 1 and ep > 1, pipeline_dtype=torch.float32, **pipeline)
        config.sequence_parallel = False  # megatron demands SP for MoE at TP x EP; shapes do not depend on it
        models = chunks(ck)
        assert len(models) == vpp
        for vp, sd in enumerate(models):
            model = _stage_model(cfg, config, ck["args"].padded_vocab_size, vp if vpp > 1 else None)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            assert not unexpected and all(k.endswith("._extra_state") for k in missing), (rank, vp, missing, unexpected)
    finally:
        ps.destroy_model_parallel()


def _stage_model(cfg, config, padded, vp):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from test_mcore_names import _NoCoreAttention

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp)
    if config.multi_latent_attention:
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = _NoCoreAttention
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp) if config.mtp_num_layers else None
    return GPTModel(config, spec, vocab_size=padded, max_sequence_length=64, position_embedding_type="rope",
                    share_embeddings_and_output_weights=bool(cfg["tie_word_embeddings"]), mtp_block_spec=mtp,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp)


def test_megatron_loads_every_rank_file_strictly(make_hf, tmp_path):
    jobs = []
    for i, (key, overrides, flags, pipeline) in enumerate(JOBS):
        hf, cfg, _ = make_hf(key, name=f"hf{i}", **overrides)
        hf_to_mcore(hf, tmp_path / f"mc{i}", **flags)
        jobs.append((str(tmp_path / f"mc{i}"), cfg, flags, pipeline))
    testing.run_world(_world, 4, jobs, timeout_s=150)
