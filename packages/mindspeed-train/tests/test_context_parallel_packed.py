"""Packed (THD) sequences under context parallelism through `mindspeed train` (issue #7).

Neat-packed SFT data (conversations of uneven lengths, most not multiples of 2 x cp, several per
pack) trained 4 steps at CP=2 with ring (``megatron_cp_algo``) and ulysses (``ulysses_cp_algo``)
must give the losses (1e-5) and gradient norms (1e-4) of the same packed job on one process,
which runs megatron's THD path (one row, cu_seqlens, positions restarting per document). The
DeepSeek-V3-style model (MLA, MoE, MTP) does the same with ulysses over all four steps and with
ring over its first two (see the test for why not four), so MLA's rotary and the MTP roll respect
the documents too. The padding/splitting helper is checked against a naive construction, and the
combinations packed CP does not cover stop the launch with a one-line error.
(That no token attends across documents is checked on the model's logits, against each document
run alone, in mindspeed-models' tests/test_context_parallel_packed.py.)
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import train_helpers as th

from mindspeed_kernels.testing import run_world

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from conftest import build_tokenizer  # noqa: E402

SEQ = 64
CP2 = ("--context-parallel-size", "2", "--use-mcore-models")
RUNS = {"ring": (*CP2, "--context-parallel-algo", "megatron_cp_algo"),
        "ulysses": (*CP2, "--context-parallel-algo", "ulysses_cp_algo")}  # fmt: skip
WORDS = "the quick brown fox jumps over lazy dog hello world two plus four answer briefly code numbers".split()


def _conversations(count: int = 40) -> list[dict]:
    """Alpaca-style samples whose token counts vary (1-8 words of instruction and of output)."""
    out = []
    for i in range(count):
        instruction = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7))
        output = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + (5 * i) % 8))
        out.append({"instruction": instruction, "input": "", "output": output})
    return out


def _write_model(root: str, vocab: int, model_type: str = "qwen2") -> None:
    if model_type == "qwen2":
        path = os.path.join(root, "model")
        os.makedirs(path, exist_ok=True)
        config = dict(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                      eos_token_id=0, tie_word_embeddings=False, attention_dropout=0.0)  # fmt: skip
    else:
        path = th.write_deepseek(root)
        with open(os.path.join(path, "config.json")) as handle:
            config = dict(json.load(handle), vocab_size=vocab, max_position_embeddings=256)
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A tokenizer, neat-packed conversations, the tiny qwen2 and DeepSeek configs, and the
    one-process packed runs every CP run is compared with."""
    from mindspeed_train.data.cli import main as preprocess

    base = tmp_path_factory.mktemp("cp_packed")
    tok = build_tokenizer(base / "tok")
    vocab = len(transformers.AutoTokenizer.from_pretrained(tok))
    _write_model(str(base), vocab)
    _write_model(str(base), vocab, "deepseek")
    (base / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in _conversations()))
    assert preprocess(["--input", str(base / "data.jsonl"), "--tokenizer-name-or-path", tok, "--handler-name",
                       "AlpacaStyleInstructionHandler", "--prompt-type", "chatml", "--seq-length", str(SEQ),
                       "--output-prefix", str(base / "neat"), "--neat-pack"]) == 0  # fmt: skip
    run_world(_reference_world, 1, str(base), timeout_s=200)
    return str(base)


def _flags(root: str, name: str, model: str = "model", extra: tuple[str, ...] = ()) -> list[str]:
    return ["--model", os.path.join(root, model), "--data-path", os.path.join(root, "neat"), "--is-instruction-dataset",
            "--neat-pack", "--tokenizer-name-or-path", os.path.join(root, "tok"), "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-2",
            "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--lr-decay-iters", "4",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234", "--no-shuffle", "--split", "100,0,0",
            "--log-interval", "1", "--output-dir", os.path.join(root, name), *extra]  # fmt: skip


def _train(root: str, name: str, model: str = "model", extra: tuple[str, ...] = ()) -> None:
    from mindspeed_train.launch import train

    torch.set_num_threads(1)  # ranks share 2 cores
    train(_flags(root, name, model, extra))


def _reference_world(rank: int, root: str) -> None:
    _train(root, "ref")
    _train(root, "ref_deepseek", "deepseek")


def _cp2_world(rank: int, root: str) -> None:
    for name, extra in RUNS.items():
        _train(root, name, extra=extra)
    _train(root, "deepseek_ring", "deepseek", RUNS["ring"])
    _train(root, "deepseek_ulysses", "deepseek", RUNS["ulysses"])


def test_packs_hold_documents_of_uneven_lengths(root):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    masks = IndexedDataset(os.path.join(root, "neat_packed_attention_mask_document"))
    lengths = [int((masks[i] == doc).sum()) for i in range(len(masks)) for doc in range(1, int(masks[i].max()) + 1)]
    assert len(masks) >= 16 and max(int(masks[i].max()) for i in range(len(masks))) > 1
    assert len({n % 4 for n in lengths}) > 1, lengths  # some documents need padding to 2 x cp


def test_cp2_packed_runs_match_one_process(root):
    run_world(_cp2_world, 2, root, timeout_s=280)
    ref = th.read(os.path.join(root, "ref"))
    for name in RUNS:
        th.assert_same_run(th.read(os.path.join(root, name)), ref)
    # DeepSeek (MLA, MoE with the aux-loss-free router bias, MTP) with ulysses, which splits the
    # unpadded stream: the whole run equals one process.
    deepseek = th.read(os.path.join(root, "ref_deepseek"))
    th.assert_same_run(th.read(os.path.join(root, "deepseek_ulysses")), deepseek)
    # With ring: steps 1 and 2 only. The router bias moves by the sign of each expert's token count
    # after every step, and ring's per-document padding tokens are routed (and counted) like the
    # rows' own padding; from step 3 a flipped sign may route differently. Steps 1-2 check MLA's
    # rotary, attention and the MTP roll (loss, its gradients, the MTP loss) exactly.
    ring = th.read(os.path.join(root, "deepseek_ring"))
    assert {"mtp_1 loss"} <= set(deepseek[0]["aux"]), deepseek[0]["aux"]
    for mine, ref in zip(ring[:2], deepseek[:2], strict=True):
        assert abs(mine["loss"] - ref["loss"]) <= th.LOSS_TOL and abs(mine["grad_norm"] - ref["grad_norm"]) <= th.NORM_TOL
        assert abs(mine["aux"]["mtp_1 loss"] - ref["aux"]["mtp_1 loss"]) <= th.LOSS_TOL, (mine, ref)


class _Layout:
    """A ContextParallel for the data layout only (no process groups are needed to split)."""

    @staticmethod
    def make(algo: str, size: int, rank: int, ulysses: int | None = None):
        from mindspeed_models.context_parallel import ContextParallel
        from mindspeed_parallel.cp.config import CPConfig

        return ContextParallel(CPConfig(algo=algo, size=size, ulysses_degree=ulysses), None, rank)


def _naive_split(batch: dict, multiple: int, cp: int, rank: int, zigzag: bool) -> dict:
    """Ring (``zigzag``), per document: cut it out, pad it with zeros to the multiple, take this rank's
    two chunks. Ulysses: this rank's contiguous slice of the whole unpadded stream."""
    if not zigzag:
        return {key: batch[key].reshape(-1).chunk(cp)[rank].reshape(1, -1)
                for key in ("tokens", "labels", "loss_mask", "position_ids")}  # fmt: skip
    segments = batch["segments"].reshape(-1).tolist()
    width = batch["segments"].shape[1]
    bounds, start = [], 0
    for t in range(1, len(segments) + 1):
        if t == len(segments) or segments[t] != segments[t - 1] or t % width == 0:
            bounds.append((start, t))
            start = t
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        flat, parts = batch[key].reshape(-1), []
        for a, b in bounds:
            doc = torch.cat([flat[a:b], flat.new_zeros(-(b - a) % multiple)])
            chunks = doc.chunk(2 * cp)
            parts += [chunks[rank], chunks[2 * cp - 1 - rank]]
        out[key] = torch.cat(parts).reshape(1, -1)
    return out


@pytest.mark.parametrize("algo, zigzag, multiple", [("megatron_cp_algo", True, 4), ("ulysses_cp_algo", False, 1)])
def test_split_packed_batch_equals_naive_per_document_split(algo, zigzag, multiple):
    from mindspeed_train.context import split_packed_batch

    gen = torch.Generator().manual_seed(0)
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 2, 2, 3]])
    batch = {"tokens": torch.randint(1, 100, (2, 10), generator=gen), "labels": torch.randint(1, 100, (2, 10), generator=gen),
             "loss_mask": torch.rand(2, 10, generator=gen), "position_ids": torch.arange(10).repeat(2, 1),
             "segments": segments}  # fmt: skip
    totals = []
    for rank in range(2):
        cp = _Layout.make(algo, 2, rank)
        assert cp.packed_multiple == multiple
        got, params = split_packed_batch(batch, cp)
        want = _naive_split(batch, multiple, 2, rank, zigzag)
        assert set(got) == {*want, "real_mask"}
        ones = _naive_split({**batch, "labels": torch.ones_like(batch["labels"])}, multiple, 2, rank, zigzag)["labels"]
        torch.testing.assert_close(got["real_mask"], ones, rtol=0, atol=0)  # 1 on the batch's tokens, 0 on padding
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
        padded = [-(-n // multiple) * multiple for n in (3, 5, 2, 7, 2, 1)]
        assert params.qkv_format == "sbhd" and params.cu_seqlens_q.tolist() == [0, *torch.tensor(padded).cumsum(0).tolist()]
        totals.append(float(got["loss_mask"].sum()))
    assert sum(totals) == pytest.approx(float(batch["loss_mask"].sum()))  # every real token kept once, pads masked


def test_hybrid_pads_to_the_ring_and_ulysses_multiples():
    # 2 ulysses x 2 ring: zig-zag over the 2 ring ranks (4 chunks), then halves over ulysses
    assert _Layout.make("hybrid_cp_algo", 4, 0, ulysses=2).packed_multiple == 4
    assert _Layout.make("hybrid_cp_algo", 6, 0, ulysses=3).packed_multiple == 12


def test_pad_packed_equals_naive_padding():
    from mindspeed_parallel.cp.data import pad_packed, padded_packed_rows

    x = torch.arange(1, 15).reshape(7, 2)
    got, ends = pad_packed(x, torch.tensor([0, 3, 4, 7], dtype=torch.int32), 4, value=-1)
    want = torch.cat([x[0:3], torch.full((1, 2), -1), x[3:4], torch.full((3, 2), -1), x[4:7], torch.full((1, 2), -1)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ends == [4, 8, 12] and padded_packed_rows([3, 4, 7], 1)[1] == [3, 4, 7]
    with pytest.raises(ValueError, match="multiple=0 must be a positive int"):
        padded_packed_rows([3], 0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--context-parallel-algo", "adaptive_cp_algo"), "--context-parallel-algo adaptive_cp_algo cannot take packed"),
        (("--context-parallel-algo", "hybrid_adaptive_cp_algo", "--ulysses-degree-in-cp", "2"),
         "hybrid_adaptive_cp_algo cannot take packed"),
        (("--context-parallel-algo", "megatron_cp_algo", "--cp-attention-mask-type", "general"),
         "--cp-attention-mask-type general with packed sequences"),
        (("--context-parallel-algo", "megatron_cp_algo", "--pipeline-model-parallel-size", "2"),
         "megatron's pipeline p2p sends fixed shapes; use --pipeline-model-parallel-size 1"),
        (("--context-parallel-algo", "megatron_cp_algo", "--tensor-model-parallel-size", "2", "--sequence-parallel"),
         "--sequence-parallel with packed sequences"),
    ],
)  # fmt: skip
def test_unsupported_packed_cp_launches_are_clear_errors(tmp_path, monkeypatch, extra, message):
    from mindspeed_train import launch

    root = str(tmp_path)
    th.prepare(root)
    monkeypatch.setattr(launch, "_world_size", lambda: 4)
    flags = th.flags(root, os.path.join(root, "x"), extra=("--use-mcore-models", "--context-parallel-size", "2",
                                                           "--reset-attention-mask", *extra))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        launch.build_config(flags)
