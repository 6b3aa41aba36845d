"""TP split/merge, against slicing written out by hand."""

import pytest
import torch

from mindspeed_ckpt.sharding import check_tp, merge_tp, padded_vocab_size, split_tp, tp_dim


@pytest.mark.parametrize("name,dim", [
    ("decoder.layers.0.self_attention.linear_qkv.weight", 0), ("decoder.layers.0.self_attention.linear_qkv.bias", 0),
    ("decoder.layers.3.mlp.linear_fc1.weight", 0), ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", 1), ("decoder.layers.0.mlp.linear_fc2.weight", 1),
    ("decoder.layers.0.self_attention.linear_proj.bias", None), ("decoder.layers.0.mlp.linear_fc2.bias", None),
    ("decoder.layers.0.input_layernorm.weight", None), ("decoder.final_layernorm.weight", None),
    ("decoder.layers.0.self_attention.q_layernorm.weight", None),
    # MLA (local spec: all five projections are ColumnParallelLinear), MTP, MoE at expert TP 1
    ("decoder.layers.0.self_attention.linear_q_down_proj.weight", 0),
    ("decoder.layers.0.self_attention.linear_q_proj.weight", 0),
    ("decoder.layers.0.self_attention.linear_kv_up_proj.weight", 0),
    ("decoder.layers.0.self_attention.kv_layernorm.weight", None),
    ("mtp.layers.0.eh_proj.weight", 0), ("mtp.layers.0.enorm.weight", None),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", None),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", None),
    ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight", 0), ("decoder.layers.1.mlp.shared_experts.linear_fc2.weight", 1),
    ("decoder.layers.1.mlp.shared_experts.gate_weight", None), ("decoder.layers.1.mlp.router.weight", None),
    ("decoder.layers.1.mlp.router.expert_bias", None),
])
def test_tp_dim(name, dim):
    assert tp_dim(name) == dim


def test_gate_up_split_takes_each_half_separately():
    fc1 = torch.arange(8.0).reshape(8, 1)  # gate rows 0-3, up rows 4-7
    shards = [split_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, 2, r) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5] and shards[1].flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_tp("decoder.layers.0.mlp.linear_fc1.weight", shards), fc1)


def test_split_is_a_fresh_copy_and_merge_inverts():
    w = torch.randn(6, 4)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    shards = [split_tp(name, w, 2, r) for r in range(2)]
    assert shards[0].untyped_storage().nbytes() == 6 * 2 * 4  # not the full tensor's storage
    assert torch.equal(shards[1], w[:, 2:]) and torch.equal(merge_tp(name, shards), w)


def test_replicated_shards_must_agree():
    with pytest.raises(ValueError, match="differs between rank 0 and rank 1"):
        merge_tp("decoder.final_layernorm.weight", [torch.zeros(3), torch.ones(3)])


def test_indivisible_dim_names_the_tensor():
    with pytest.raises(ValueError, match="linear_proj.weight"):
        split_tp("decoder.layers.0.self_attention.linear_proj.weight", torch.zeros(4, 5), 2, 0)


def test_padded_vocab_and_tp_checks():
    assert padded_vocab_size(96, 128, 1) == 128 and padded_vocab_size(96, 128, 2) == 256
    assert padded_vocab_size(151936, 128, 4) == 152064 and padded_vocab_size(96, 1, 2) == 96
    with pytest.raises(ValueError, match="intermediate_size=6"):
        check_tp({"heads": 4, "groups": 4, "ffn": 6}, 4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        check_tp({"heads": 8, "groups": 8, "ffn": 8, "kv_down": 12}, 8)
