"""``mindspeed convert``: Hugging Face <-> Megatron checkpoint conversion.

::

    mindspeed convert hf-to-mcore --hf-dir D --out M --tp T --pp P [--dtype fp32|bf16|fp16]
                                  [--make-vocab-size-divisible-by N] [--overwrite]
    mindspeed convert mcore-to-hf --mcore-dir M --out D2 [--hf-config D] [--overwrite]

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from mindspeed_ckpt.convert import DTYPES, hf_to_mcore, mcore_to_hf
from mindspeed_ckpt.hf_io import DEFAULT_SHARD_BYTES


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mindspeed convert", description="Convert checkpoints between Hugging Face and Megatron.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    h = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron legacy checkpoint")
    h.add_argument("--hf-dir", required=True, help="directory with config.json and model*.safetensors")
    h.add_argument("--out", required=True, help="Megatron checkpoint directory to create")
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    h.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    h.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep the HF dtype)")
    h.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of N * TP, as megatron does (default 128)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    m = sub.add_parser("mcore-to-hf", help="Megatron legacy checkpoint -> HF safetensors directory")
    m.add_argument("--mcore-dir", required=True, help="directory with latest_checkpointed_iteration.txt")
    m.add_argument("--out", required=True, help="HF directory to create")
    m.add_argument("--hf-config", help="directory with config.json and tokenizer files (default: MCORE_DIR/hf_config)")
    m.add_argument("--max-shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES // 2**20,
                   help="largest safetensors shard in MiB (default 5120)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return ap


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "hf-to-mcore":
        out = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite)
        print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}) to {out}")
        return 0
    if args.max_shard_size_mb < 1:
        raise UsageError(f"mindspeed convert mcore-to-hf: --max-shard-size-mb must be >= 1; got {args.max_shard_size_mb}")
    out = mcore_to_hf(args.mcore_dir, args.out, hf_config=args.hf_config, overwrite=args.overwrite,
                      max_shard_bytes=args.max_shard_size_mb * 2**20)
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mindspeed convert`` (and ``python -m mindspeed_ckpt.cli``)."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, TypeError, NotImplementedError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
