"""Packed sequences under context parallelism, on the model's logits: a tiny random qwen2 (GQA)
at CP=2 given four documents of uneven lengths (none a multiple of 2 x cp) packed into one row,
padded and split per document with ring and hybrid, split contiguously unpadded with ulysses, must give every
document's logits as transformers computes them for that document alone (fp32, max abs diff
<= 1e-4, same argmax): no token sees another document and rotary angles restart per document,
whatever the layout. Changing one document must leave the other documents' logits unchanged.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

from mindspeed_kernels.testing import run_world  # noqa: E402

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

LENGTHS = (5, 11, 3, 9)
ALGORITHMS = (("megatron_cp_algo", None), ("ulysses_cp_algo", None), ("hybrid_cp_algo", 2))


def _documents(vocab: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]


def _packed_logits(model, cp, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every document's logits [n, V] from one packed forward at CP (gathered from all cp ranks)."""
    import torch.distributed as dist

    from mindspeed_parallel.cp.data import pad_packed

    cu = torch.tensor([len(d) for d in docs]).cumsum(0).tolist()
    tokens, padded = pad_packed(torch.cat(docs), cu, cp.packed_multiple)
    positions, _ = pad_packed(torch.cat([torch.arange(len(d)) for d in docs]), cu, cp.packed_multiple)
    rows, _ = cp.packed_rows_of(padded, cp.rank)
    with torch.no_grad():
        local = model(tokens[rows][None], positions[rows][None], None, packed_seq_params=cp.packed_params(padded))[0]
    parts = [torch.empty_like(local) for _ in range(cp.config.size)]
    dist.all_gather(parts, local.contiguous(), group=cp.groups.cp)
    full = local.new_zeros(padded[-1], local.shape[-1])
    for rank, part in enumerate(parts):
        full[cp.packed_rows_of(padded, rank)[0]] = part
    starts = [0, *padded[:-1]]
    return [full[start : start + len(doc)] for start, doc in zip(starts, docs, strict=True)]


def _cp_world(rank: int, want: list[torch.Tensor], changed: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm
    from mindspeed_models import adaptor
    from mindspeed_models.context_parallel import ContextParallel, enable_context_parallel
    from mindspeed_models.pretrained import load_state
    from mindspeed_parallel.cp import runtime
    from mindspeed_parallel.cp.config import CPConfig

    torch.set_num_threads(1)
    adaptor.install()
    ps.initialize_model_parallel(context_parallel_size=2)
    cfg, hf_model = helpers.tiny_hf("qwen2")
    docs = _documents(cfg["vocab_size"])
    for algo, ulysses in ALGORITHMS:
        spec = mm.from_hf_config(cfg, perform_initialization=False, context_parallel_size=2)
        model = mm.build_model(spec).eval()
        load_state(model, helpers.naive_state(cfg, hf_model, spec.padded_vocab_size))
        config = CPConfig(algo=algo, size=2, ulysses_degree=ulysses)
        group = ps.get_context_parallel_group()
        cp = ContextParallel(config, runtime.make_groups(config, group, [dist.get_process_group_ranks(group)]), rank)
        enable_context_parallel(model, cp)
        got = _packed_logits(model, cp, docs)
        for doc, (mine, theirs) in enumerate(zip(got, want, strict=True)):
            mask = torch.ones(1, len(mine), dtype=torch.long)
            diff = helpers.assert_logits_match(mine[None], theirs[None], mask)
            assert diff <= 1e-4, (algo, doc, diff)
        # a different document 1 leaves documents 0, 2 and 3 as they were (bit for bit: same rows, same blocks)
        other = _packed_logits(model, cp, [docs[0], changed[1], docs[2], docs[3]])
        for doc in (0, 2, 3):
            torch.testing.assert_close(other[doc], got[doc], rtol=0, atol=0, msg=f"{algo}: document {doc} changed")
        assert (other[1] - got[1]).abs().max() > 1e-2, algo


def test_packed_documents_under_cp_equal_transformers_on_each_alone():
    cfg, hf_model = helpers.tiny_hf("qwen2")
    docs = _documents(cfg["vocab_size"])
    changed = _documents(cfg["vocab_size"], seed=11)
    with torch.no_grad():
        want = [hf_model(input_ids=doc[None]).logits.float()[0] for doc in docs]
    run_world(_cp_world, 2, want, changed, timeout_s=240)
