"""``mindspeed convert verify``: does a Megatron checkpoint compute what its Hugging Face original computes?

Runs both sides in float32 on the same random token batch and compares logits at the real
(unpadded) positions:

- Hugging Face: ``transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=float32)``;
- Megatron: ``mindspeed_models.load_pretrained(mcore_dir)`` (legacy or torch_dist, any layout),
  a world-size-1 megatron-core GPTModel.

Neither transformers nor mindspeed-models is a dependency of mindspeed-ckpt: both are imported
here, lazily, and their absence is a one-line ``ImportError`` naming the ``pip install``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["VerifyResult", "make_batch", "verify"]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`. ``max_abs_diff``: largest |HF - megatron| logit over valid
    positions; ``argmax_mismatches``: valid positions whose top token differs; ``positions``:
    valid positions compared; ``lengths``: real tokens per sequence; ``atol``: the tolerance."""

    max_abs_diff: float
    argmax_mismatches: int
    positions: int
    lengths: tuple[int, ...]
    vocab_size: int
    atol: float

    @property
    def passed(self) -> bool:
        """Within ``atol`` (NaN fails) and the same argmax everywhere."""
        return self.max_abs_diff <= self.atol and self.argmax_mismatches == 0

    def report(self) -> str:
        """A few human-readable lines, the last one ``PASS`` or ``FAIL``."""
        verdict = "PASS" if self.passed else "FAIL"
        return "\n".join([
            f"compared fp32 logits at {self.positions} positions (sequence lengths {list(self.lengths)}, "
            f"vocab {self.vocab_size})",
            f"max abs logit diff: {self.max_abs_diff:.3e} (atol {self.atol:g})",
            f"argmax mismatches:  {self.argmax_mismatches}",
            f"{verdict}",
        ])


def make_batch(vocab_size: int, seq_len: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``input_ids`` and HF-style ``attention_mask`` (both [batch, seq_len], int64).

    Sequence ``i`` has ``seq_len * (batch - i) // batch`` real tokens (at least 1): lengths all
    differ when ``seq_len >= batch``, so right padding is exercised. Pad positions hold token 0.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    lengths = [max(1, seq_len * (batch - i) // batch) for i in range(batch)]
    mask = (torch.arange(seq_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids * mask, mask


def _require(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"mindspeed convert verify needs {module}: pip install {pip}")


def _check_args(hf_dir: Path, mcore_dir: Path, seq_len: int, batch: int, atol: float) -> dict:
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"--hf-dir {hf_dir}: no config.json; pass a Hugging Face model directory")
    if not mcore_dir.is_dir():
        raise FileNotFoundError(f"--mcore-dir {mcore_dir} is not a directory; pass a Megatron checkpoint directory")
    if seq_len < 1 or batch < 1:
        raise ValueError(f"--seq-len and --batch must be >= 1; got {seq_len} and {batch}")
    if not atol >= 0:
        raise ValueError(f"--atol must be >= 0; got {atol}")
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        vocab = int(config["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"--hf-dir {hf_dir}/config.json: no integer vocab_size ({exc!r})") from None
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds max_position_embeddings {limit} of {hf_dir}/config.json; lower it")
    return config | {"vocab_size": vocab}


def hf_logits(hf_dir: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, V] float32 logits from transformers (eval, no grad)."""
    _require("transformers", "transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    del model
    return out


def mcore_logits(mcore_dir: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, V] float32 logits from the megatron-core model ``mindspeed_models.load_pretrained`` builds."""
    _require("mindspeed_models", "mindspeed-models")
    import mindspeed_models

    pm = mindspeed_models.load_pretrained(mcore_dir, dtype=torch.float32)
    return pm.logits(ids, mask).float()


def compare(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor, atol: float) -> VerifyResult:
    """Compare [B, S, V] logits at the positions where ``mask`` [B, S] is 1."""
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: transformers {tuple(ref.shape)}, megatron {tuple(got.shape)}; "
                         "the two checkpoints are not the same model")
    valid = mask.bool()
    a, b = ref[valid], got[valid]  # [N, V]
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        diff = float("nan")  # NaN never passes (NaN <= atol is False)
    mismatches = int((a.argmax(-1) != b.argmax(-1)).sum())
    lengths = tuple(int(n) for n in mask.sum(-1))
    return VerifyResult(max_abs_diff=float(diff), argmax_mismatches=mismatches, positions=int(valid.sum()),
                        lengths=lengths, vocab_size=ref.shape[-1], atol=atol)


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *, seq_len: int = 32, batch: int = 2,
           seed: int = 0, atol: float = 1e-4) -> VerifyResult:
    """Run transformers on ``hf_dir`` and megatron-core on ``mcore_dir`` (both fp32) over one random
    right-padded batch ([batch, seq_len] tokens, seeded by ``seed``) and compare the logits.

    Raises FileNotFoundError/ValueError for bad input (one line, naming the flag) and ImportError
    when transformers or mindspeed-models is not installed.
    """
    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    config = _check_args(hf_dir, mcore_dir, seq_len, batch, atol)
    _require("transformers", "transformers")
    _require("mindspeed_models", "mindspeed-models")
    ids, mask = make_batch(config["vocab_size"], seq_len, batch, seed)
    ref = hf_logits(hf_dir, ids, mask)
    got = mcore_logits(mcore_dir, ids, mask)
    return compare(ref, got, mask, atol)


def run_cli(args) -> int:
    """``mindspeed convert verify``: print the report; 0 on pass, 1 on failure."""
    result = verify(args.hf_dir, args.mcore_dir, seq_len=args.seq_len, batch=args.batch, seed=args.seed, atol=args.atol)
    print(result.report())
    return 0 if result.passed else 1
