"""Instruction (SFT) training through `mindspeed train --is-instruction-dataset`, checked against
Hugging Face transformers: a HF qwen2 model is converted with `mindspeed convert hf-to-mcore`
(torch_dist), fine-tuned from it with ``--finetune --load``, and the first step's loss (taken at
the initial weights) must equal the loss transformers computes on the same conversations with the
same labels (``-100`` on the prompt; transformers shifts them itself).

Layouts: one conversation per row padded to ``--seq-length`` (token mean per microbatch, averaged);
``--variable-seq-lengths`` (rows padded to the longest of the microbatch); neat packs fed as THD
rows with cu_seqlens and ``--calculate-per-token-loss`` (the token mean over the global batch) —
equal to transformers only if no sample attends to another in its pack; the per-token loss on two
DP ranks (different token counts per rank) too. Plain ``--pack`` data
(samples may see each other) must differ, and neat packs without ``--neat-pack`` are refused.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import train_helpers as th  # noqa: E402
from conftest import build_tokenizer  # noqa: E402

SAMPLES = [
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "Say hello", "input": "to the world", "output": "Hello world!", "system": "Be brief."},
    {"instruction": "Name the fox", "output": "The quick brown fox."},
    {"instruction": "Tell me about the lazy dog", "output": "The lazy dog sleeps."},
] * 2
SEQ = 128


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tokenizer, a random HF qwen2 (safetensors), its torch_dist conversion and three
    preprocessed variants (plain rows, neat packs, plain packs) of the same conversations."""
    from mindspeed_ckpt.cli import main as convert
    from mindspeed_train.data.cli import main as preprocess

    base = tmp_path_factory.mktemp("sft")
    tok = build_tokenizer(base / "tok")
    n_vocab = len(transformers.AutoTokenizer.from_pretrained(tok))
    # initializer_range 0.3: weights large enough that outputs depend on the context, so attention
    # across pack boundaries shows in the loss
    config = transformers.AutoConfig.for_model(
        "qwen2", vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, attention_dropout=0.0,
        eos_token_id=0, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base / "hf")
    assert convert(["hf-to-mcore", "--hf-dir", str(base / "hf"), "--out", str(base / "mcore"), "--format", "torch_dist",
                    "--make-vocab-size-divisible-by", "1"]) == 0
    (base / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    common = ["--input", str(base / "data.jsonl"), "--tokenizer-name-or-path", tok, "--handler-name",
              "AlpacaStyleInstructionHandler", "--prompt-type", "chatml", "--seq-length", str(SEQ)]  # fmt: skip
    for name, extra in {"rows": [], "neat": ["--neat-pack"], "pack": ["--pack"]}.items():
        assert preprocess([*common, "--output-prefix", str(base / name), *extra]) == 0
    return base


def _train(root, out: str, data: str, *extra: str, micro: int = 2, global_batch: int = 4) -> float:
    from mindspeed_train.launch import train

    argv = ["--data-path", str(root / data), "--is-instruction-dataset", "--load", str(root / "mcore"), "--finetune",
            "--tokenizer-name-or-path", str(root / "tok"), "--seq-length", str(SEQ), "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--train-iters", "1", "--lr", "1e-3", "--no-shuffle", "--split", "100,0,0",
            "--log-interval", "1", "--make-vocab-size-divisible-by", "1", "--output-dir", str(root / out), *extra]  # fmt: skip
    return train(argv)[0].loss


def _hf_losses(root) -> list[tuple[float, int]]:
    """(summed CE, target count) per conversation, by transformers on the converted model's source."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    ids, labels = (IndexedDataset(str(root / f"rows_packed_{key}_document")) for key in ("input_ids", "labels"))
    out = []
    with torch.no_grad():
        for i in range(len(ids)):
            x, y = torch.as_tensor(ids[i], dtype=torch.long)[None], torch.as_tensor(labels[i], dtype=torch.long)[None]
            logits = model(x).logits.float()
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], y[0, 1:], ignore_index=-100, reduction="sum")
            out.append((float(ce), int((y[0, 1:] != -100).sum())))
    return out


def test_sft_loss_equals_transformers(root):
    """First global batch = the first four conversations (--no-shuffle), in two microbatches of two:
    the loss is the mean of the microbatches' token means."""
    per_sample = _hf_losses(root)[:4]
    pairs = (per_sample[:2], per_sample[2:])
    mean_of_means = sum(sum(ce for ce, _ in pair) / sum(n for _, n in pair) for pair in pairs) / 2
    token_mean = sum(ce for ce, _ in per_sample) / sum(n for _, n in per_sample)
    assert _train(root, "rows", "rows", "--save", str(root / "rows_ck")) == pytest.approx(mean_of_means, abs=1e-5)
    variable = _train(root, "variable", "rows", "--variable-seq-lengths", "--pad-to-multiple-of", "8")
    assert variable == pytest.approx(mean_of_means, abs=1e-5)
    assert _train(root, "rows_tok", "rows", "--calculate-per-token-loss") == pytest.approx(token_mean, abs=1e-5)


def test_neat_packs_attend_within_samples(root):
    """One global batch holds every pack, so every conversation; per-token loss weighs them as
    transformers' token sum / token count does."""
    per_sample = _hf_losses(root)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    masks = IndexedDataset(str(root / "neat_packed_attention_mask_document"))
    packs = len(masks)
    assert packs < len(SAMPLES) and max(int(masks[i].max()) for i in range(packs)) > 1
    token_mean = sum(ce for ce, _ in per_sample) / sum(n for _, n in per_sample)
    batch = {"micro": 1, "global_batch": packs}
    neat = _train(root, "neat", "neat", "--neat-pack", "--calculate-per-token-loss", **batch)
    assert neat == pytest.approx(token_mean, abs=1e-5)
    # the same packs without segment boundaries: samples see earlier samples, the loss changes
    assert abs(_train(root, "pack", "pack", "--calculate-per-token-loss", **batch) - token_mean) > 1e-3


def _dp2_world(rank: int, root: str) -> None:
    import pathlib

    _train(pathlib.Path(root), "dp2", "rows", "--calculate-per-token-loss", "--variable-seq-lengths",
           "--use-distributed-optimizer")  # fmt: skip


def test_dp2_per_token_loss_equals_transformers(root):
    """Two DP ranks with different token counts: megatron sums token losses and counts over DP, so
    the loss is still the global batch's token mean."""
    from mindspeed_kernels.testing import run_world

    per_sample = _hf_losses(root)[:4]
    run_world(_dp2_world, 2, str(root), timeout_s=150)
    (step,) = th.read(str(root / "dp2"))
    assert step["loss"] == pytest.approx(sum(ce for ce, _ in per_sample) / sum(n for _, n in per_sample), abs=1e-5)


def test_the_checkpoint_exports_with_its_tokenizer(root):
    """--save copies the --tokenizer-name-or-path files next to config.json (SAVE/hf_config), so
    `mindspeed convert mcore-to-hf` alone gives a directory transformers loads model and tokenizer from."""
    from mindspeed_ckpt.cli import main as convert

    if not (root / "rows_ck").exists():
        _train(root, "rows", "rows", "--save", str(root / "rows_ck"))
    assert convert(["mcore-to-hf", "--mcore-dir", str(root / "rows_ck"), "--out", str(root / "rows_hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(root / "rows_hf")
    original = transformers.AutoTokenizer.from_pretrained(root / "tok")
    text = "<|im_start|>user\nSay hello<|im_end|>"
    assert tok(text)["input_ids"] == original(text)["input_ids"] and tok.chat_template == original.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "rows_hf")
    assert model.config.vocab_size == len(original)


def test_neat_packs_need_the_flag(root):
    with pytest.raises(ValueError, match="neat-packed; pass --neat-pack"):
        _train(root, "refused", "neat")
