"""Pipeline (even, uneven, VPP) and expert placement, against megatron's assignment written out by hand."""

import pytest

from mindspeed_ckpt.placement import EMBEDDING, OUTPUT, Grid, Slot, stage_layer_counts


def test_even_pp_places_and_inverts():
    g = Grid((2, 2))
    assert g.place("decoder.layers.3.mlp.linear_fc1.weight") == [Slot(1, 0, None, "decoder.layers.1.mlp.linear_fc1.weight")]
    assert g.place(EMBEDDING) == [Slot(0, 0, None, EMBEDDING)]
    assert g.place(OUTPUT)[0].stage == 1 and g.place("decoder.final_layernorm.weight")[0].stage == 1
    assert g.global_name(1, 0, 0, "decoder.layers.1.mlp.linear_fc1.weight") == "decoder.layers.3.mlp.linear_fc1.weight"


def test_stage_layer_counts():
    assert stage_layer_counts(4, 2) == (2, 2)
    assert stage_layer_counts(4, 2, layer_list=(1, 3)) == (1, 3)
    assert stage_layer_counts(7, 3, first=1) == (1, 3, 3)  # megatron: the rest spread over the other stages
    assert stage_layer_counts(7, 3, first=1, last=2) == (1, 4, 2)
    assert stage_layer_counts(4, 2, last=3) == (1, 3)
    with pytest.raises(ValueError, match="--num-layer-list 1,2"):
        stage_layer_counts(4, 2, layer_list=(1, 2))
    with pytest.raises(ValueError, match="--pp"):
        stage_layer_counts(4, 3)
    with pytest.raises(ValueError, match="--decoder-first/last"):
        stage_layer_counts(8, 3, first=1)  # 7 layers left for 2 stages


def test_uneven_pp():
    g = Grid((1, 3))
    assert g.place("decoder.layers.0.input_layernorm.weight")[0].stage == 0
    assert g.place("decoder.layers.3.input_layernorm.weight") == [Slot(1, 0, None, "decoder.layers.2.input_layernorm.weight")]
    assert g.global_name(1, 0, 0, "decoder.layers.0.x") == "decoder.layers.1.x"


def test_vpp_interleaves_chunks_as_megatron():
    # pp 2, vpp 2, 8 layers: L = 2 per chunk; chunk c of stage s starts at c*pp*L + s*L
    g = Grid((4, 4), vpp=2)
    where = {i: g.place(f"decoder.layers.{i}.w")[0] for i in range(8)}
    assert [(w.stage, w.chunk, w.local) for w in where.values()] == [
        (0, 0, "decoder.layers.0.w"), (0, 0, "decoder.layers.1.w"), (1, 0, "decoder.layers.0.w"), (1, 0, "decoder.layers.1.w"),
        (0, 1, "decoder.layers.0.w"), (0, 1, "decoder.layers.1.w"), (1, 1, "decoder.layers.0.w"), (1, 1, "decoder.layers.1.w"),
    ]
    assert g.place(OUTPUT) == [Slot(1, 1, None, OUTPUT)] and g.place(EMBEDDING) == [Slot(0, 0, None, EMBEDDING)]
    assert g.global_name(0, 1, 0, "decoder.layers.1.w") == "decoder.layers.5.w"
    with pytest.raises(ValueError, match="--vpp 3"):
        Grid((4, 4), vpp=3)


def test_experts_split_over_ep_with_local_numbering():
    g = Grid((2,), ep=2, experts=4)
    name = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert g.place(name) == [Slot(0, 0, 1, "decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight")]
    assert g.place("decoder.layers.1.mlp.router.weight")[0].ep_rank is None
    assert g.global_name(0, 0, 1, "decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight") == name
    mtp = "mtp.layers.0.transformer_layer.mlp.experts.local_experts.2.linear_fc1.weight"
    assert g.place(mtp) == [Slot(0, 0, 1, "mtp.layers.0.transformer_layer.mlp.experts.local_experts.0.linear_fc1.weight")]
    with pytest.raises(ValueError, match="--ep 3"):
        Grid((2,), ep=3, experts=4)
    with pytest.raises(ValueError, match="--ep 2.*dense"):
        Grid((2,), ep=2)


def test_mtp_and_tied_copies_on_the_last_stage():
    g = Grid((2, 2), mtp=1, tied=True)
    assert g.place("mtp.layers.0.enorm.weight") == [Slot(1, 0, None, "mtp.layers.0.enorm.weight")]
    assert g.place(EMBEDDING) == [Slot(0, 0, None, EMBEDDING), Slot(1, 0, None, EMBEDDING, copy=True),
                                  Slot(1, 0, None, OUTPUT, copy=True)]
    assert g.global_name(1, 0, 0, EMBEDDING) is None and g.global_name(1, 0, 0, OUTPUT) is None
    assert Grid((4,), mtp=1).place(EMBEDDING) == [Slot(0, 0, None, EMBEDDING)]  # PP 1: one copy
    with pytest.raises(ValueError, match="belongs to the last"):
        g.global_name(0, 0, 0, "mtp.layers.0.enorm.weight")
