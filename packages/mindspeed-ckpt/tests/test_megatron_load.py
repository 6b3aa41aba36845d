"""The converted rank files against megatron-core and transformers: TP=2 megatron GPTModels
(local spec) load them strictly and compute the logits transformers computes from the original
HF checkpoint (llama: GQA, untied head; qwen2: q/k/v bias, tied head)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mindspeed_ckpt.convert import hf_to_mcore

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")
# the monorepo's spawn harness, a test-time helper only (mindspeed-ckpt does not depend on kernels)
testing = pytest.importorskip("mindspeed_kernels.testing")
pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

SEQ = 8


def _logits_world(rank, jobs):
    """For each (megatron dir, HF config, output file): megatron's GPTModel at TP=world size,
    this rank's file loaded, full-vocab logits written by rank 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    tp = dist.get_world_size()
    torch.cuda.current_device = lambda: torch.device("cpu")  # megatron's CUDA seam; this is a child process
    parallel_state.initialize_model_parallel(tp, 1)
    # eval mode has no dropout, but attention still enters the CUDA RNG tracker's fork
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    for mc_dir, cfg, out_path in jobs:
        _logits(rank, tp, mc_dir, cfg, out_path)
    parallel_state.destroy_model_parallel()


def _logits(rank, tp, mc_dir, cfg, out_path):
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    ck = torch.load(f"{mc_dir}/iter_0000001/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=False)
    a = ck["args"]
    config = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, ffn_hidden_size=a.ffn_hidden_size, kv_channels=a.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=a.norm_epsilon, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=a.add_bias_linear, add_qkv_bias=a.add_qkv_bias, qk_layernorm=a.qk_layernorm,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False)
    model = GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=a.qk_layernorm, normalization="RMSNorm"),
                     vocab_size=a.padded_vocab_size, max_sequence_length=64, position_embedding_type="rope",
                     rotary_base=int(a.rotary_base),
                     share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights)
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), (missing, unexpected)
    tokens = (torch.arange(SEQ) * 7 % cfg["vocab_size"]).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # explicit: the default mask is built on CUDA
    model.eval()
    with torch.no_grad():
        local = model(tokens, torch.arange(SEQ).unsqueeze(0), mask)  # [1, SEQ, padded_vocab / tp]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous())
    if rank == 0:
        torch.save(torch.cat(parts, dim=-1)[..., : cfg["vocab_size"]], out_path)


def test_megatron_tp2_logits_match_transformers(make_hf, tmp_path):
    jobs, refs = [], {}
    for arch in ("llama", "qwen2"):
        hf, cfg, _ = make_hf(arch, name=arch, std=0.2)  # trained-model-like scales keep fp32 logits O(1)
        hf_to_mcore(hf, tmp_path / f"mc_{arch}", tp=2)
        jobs.append((str(tmp_path / f"mc_{arch}"), cfg, str(tmp_path / f"logits_{arch}.pt")))
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            refs[arch] = model(input_ids=(torch.arange(SEQ) * 7 % cfg["vocab_size"]).unsqueeze(0)).logits
        assert refs[arch].std() > 0.05  # not a vacuous comparison of near-zero logits
    testing.run_world(_logits_world, 2, jobs, timeout_s=120)
    for arch, ref in refs.items():
        testing.assert_close(torch.load(tmp_path / f"logits_{arch}.pt"), ref)  # the float32 row of TOLERANCES
