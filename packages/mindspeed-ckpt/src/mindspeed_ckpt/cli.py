"""``mindspeed convert``: Hugging Face <-> Megatron checkpoint conversion.

::

    mindspeed convert hf-to-mcore --hf-dir D --out M --tp T --pp P [--ep E] [--etp 1] [--vpp V]
                                  [--num-layer-list 1,3 | --decoder-first/last-pipeline-num-layers N]
                                  [--dtype fp32|bf16|fp16] [--make-vocab-size-divisible-by N] [--overwrite] [--progress]
                                  [--format legacy|torch_dist]   (torch_dist: no layout flags, reshardable at load)
    mindspeed convert mcore-to-hf --mcore-dir M --out D2 [--hf-config D] [--overwrite] [--progress]
                                  [--lora-dir L [--lora-alpha A] [--lora-rank R]]
    mindspeed convert reshard     --mcore-dir M --out M2 --tp T --pp P [--ep E] [--vpp V] [--num-layer-list ...]
                                  [--dtype ...] [--hf-config D] [--overwrite] [--progress]
    mindspeed convert verify      --hf-dir D --mcore-dir M [--seq-len 32 --batch 2 --seed 0 --atol 1e-4]

Exit codes: 0 success, 1 verify found a mismatch, 2 bad usage or bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from mindspeed_ckpt.plan import DEFAULT_SHARD_BYTES

# torch, convert, verify, torch_dist are imported when a command needs them: the fast path (hf-to-mcore
# and mcore-to-hf without a dtype cast or LoRA) runs without torch, whose import alone takes ~1.3 s.
DTYPES = ("bf16", "fp16", "fp32")  # convert.DTYPES' keys
# MINDSPEED_CKPT_FAST=0 forces the torch path (for comparisons); default on.
FAST = os.environ.get("MINDSPEED_CKPT_FAST", "1") != "0"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of a size as transformers' ``max_shard_size`` spells it: ``5GB`` (10**9), ``2GiB`` (2**30), ``500MB``,
    or plain bytes. UsageError naming --max-shard-size otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"mindspeed convert mcore-to-hf: --max-shard-size {text!r} must be a size like 5GB, 500MB, 2GiB "
                         "or a number of bytes >= 1")  # fmt: skip
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mindspeed convert", description="Convert checkpoints between Hugging Face and Megatron.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    h = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron legacy checkpoint")
    h.add_argument("--hf-dir", required=True, help="directory with config.json and model*.safetensors")
    h.add_argument("--out", required=True, help="Megatron checkpoint directory to create")
    _add_layout_args(h)
    h.add_argument("--dtype", choices=DTYPES, help="cast every tensor (default: keep the HF dtype)")
    h.add_argument("--format", choices=["legacy", "torch_dist"], default="legacy",
                   help="legacy mp_rank_* files (default) or torch_dist (megatron dist_checkpointing; needs mindspeed-models)")
    h.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of N * TP, as megatron does (default 128)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    h.add_argument("--progress", action="store_true", default=None, help="progress line on stderr (default: when a tty)")
    m = sub.add_parser("mcore-to-hf", help="Megatron legacy checkpoint -> HF safetensors directory")
    m.add_argument("--mcore-dir", required=True, help="directory with latest_checkpointed_iteration.txt")
    m.add_argument("--out", required=True, help="HF directory to create")
    m.add_argument("--hf-config", help="directory with config.json and tokenizer files (default: MCORE_DIR/hf_config)")
    m.add_argument("--max-shard-size", help="largest safetensors shard as transformers' save_pretrained spells it "
                   "(e.g. 5GB, 500MB, 2GiB, or bytes); wins over --max-shard-size-mb")
    m.add_argument("--max-shard-size-mb", type=int, default=DEFAULT_SHARD_BYTES // 2**20,
                   help="largest safetensors shard in MiB (default 5120)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    m.add_argument("--progress", action="store_true", default=None, help="progress line on stderr (default: when a tty)")
    m.add_argument("--lora-dir", help="LoRA adapter to merge: an HF PEFT adapter dir or a Megatron checkpoint of adapters")
    m.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: from the adapter's config or saved args)")
    m.add_argument("--lora-rank", type=int, help="LoRA rank r (default: from the adapter's config or tensor shapes)")
    _add_reshard_parser(sub)
    _add_verify_parser(sub)
    return ap


def _add_verify_parser(sub) -> None:
    """The ``verify`` subcommand's flags (``sub``: the ``mindspeed convert`` subparsers)."""
    v = sub.add_parser("verify", help="compare fp32 logits of an HF directory and a Megatron checkpoint (exit 1 on mismatch)")
    v.add_argument("--hf-dir", required=True, help="Hugging Face directory (run with transformers)")
    v.add_argument("--mcore-dir", required=True, help="Megatron checkpoint, legacy or torch_dist (run with mindspeed-models)")
    v.add_argument("--seq-len", type=int, default=32, help="tokens per sequence; later ones shorter, right padded (default 32)")
    v.add_argument("--batch", type=int, default=2, help="sequences in the random batch (default 2)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default 0)")
    v.add_argument("--atol", type=float, default=1e-4, help="largest allowed abs logit difference (default 1e-4)")



def _add_layout_args(p: argparse.ArgumentParser) -> None:
    """The output layout flags shared by hf-to-mcore and reshard."""
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size; must divide the routed experts (default 1)")
    p.add_argument("--etp", type=int, default=1, choices=[1], help="expert tensor-parallel size (only 1: experts stay whole)")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline chunks per stage (model0..; default 1)")
    p.add_argument("--num-layer-list", help="decoder layers per PP stage, comma-separated (e.g. 1,3)")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, help="layers on the first PP stage (megatron's flag)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, help="layers on the last PP stage (megatron's flag)")
    p.add_argument("--noop-layers", help="MindSpeed's pass-through layers (megatron layer indices, e.g. 61,62,63): "
                   "megatron holds num_hidden_layers + their count layers; pads for an even PP split")


def _add_reshard_parser(sub) -> None:
    r = sub.add_parser("reshard", help="Megatron legacy checkpoint -> Megatron legacy checkpoint with another TP/PP/VPP/EP")
    r.add_argument("--mcore-dir", required=True, help="input directory with latest_checkpointed_iteration.txt")
    r.add_argument("--out", required=True, help="Megatron checkpoint directory to create")
    r.add_argument("--hf-config", help="directory with config.json (default: MCORE_DIR/hf_config)")
    _add_layout_args(r)
    r.add_argument("--dtype", choices=DTYPES, help="cast every tensor (default: keep the input dtype)")
    r.add_argument("--make-vocab-size-divisible-by", type=int,
                   help="pad the vocabulary to a multiple of N * TP (default: the input's saved value, else 128)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r.add_argument("--progress", action="store_true", default=None, help="progress line on stderr (default: when a tty)")


def _run_reshard(args: argparse.Namespace) -> int:
    from mindspeed_ckpt.reshard import reshard

    out = reshard(args.mcore_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp,
                  num_layer_list=args.num_layer_list, decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
                  decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
                  noop_layers=args.noop_layers, dtype=args.dtype,
                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, hf_config=args.hf_config,
                  overwrite=args.overwrite, progress=args.progress)
    print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}, VPP={args.vpp}, EP={args.ep}) to {out}")
    return 0


def _hf_to_mcore(*a, **kw):
    """The fast path when it applies (no dtype cast, known dtypes, rank files under 4 GiB), else convert's."""
    from mindspeed_ckpt.torchfile import NotFast

    if FAST:
        from mindspeed_ckpt import fastpath

        try:
            return fastpath.hf_to_mcore(*a, **kw)
        except NotFast:
            pass
    from mindspeed_ckpt.convert import hf_to_mcore

    return hf_to_mcore(*a, **kw)


def _mcore_to_hf(*a, lora_dir=None, lora_alpha=None, lora_rank=None, **kw):
    """The fast path without LoRA when it applies (legacy input, contiguous shards), else convert's."""
    from mindspeed_ckpt.torchfile import NotFast

    if FAST and lora_dir is None:
        from mindspeed_ckpt import fastread

        try:
            return fastread.mcore_to_hf(*a, **kw)
        except NotFast:
            pass
    from mindspeed_ckpt.convert import mcore_to_hf

    return mcore_to_hf(*a, lora_dir=lora_dir, lora_alpha=lora_alpha, lora_rank=lora_rank, **kw)


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reshard":
        return _run_reshard(args)
    if args.command == "verify":
        from mindspeed_ckpt import verify

        return verify.run_cli(args)
    if args.command == "hf-to-mcore" and args.format == "torch_dist":
        from mindspeed_ckpt import torch_dist

        return torch_dist.run_cli(args)
    if args.command == "hf-to-mcore":
        out = _hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp,
                          num_layer_list=args.num_layer_list,
                          decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
                          decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
                          noop_layers=args.noop_layers, dtype=args.dtype,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite,
                          progress=args.progress)
        print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}, VPP={args.vpp}, EP={args.ep}) to {out}")
        return 0
    if args.max_shard_size_mb < 1:
        raise UsageError(f"mindspeed convert mcore-to-hf: --max-shard-size-mb must be >= 1; got {args.max_shard_size_mb}")
    shard_bytes = parse_size(args.max_shard_size) if args.max_shard_size else args.max_shard_size_mb * 2**20
    out = _mcore_to_hf(args.mcore_dir, args.out, hf_config=args.hf_config, overwrite=args.overwrite,
                      lora_dir=args.lora_dir, lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
                      max_shard_bytes=shard_bytes, progress=args.progress)
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mindspeed convert`` (and ``python -m mindspeed_ckpt.cli``)."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, TypeError, NotImplementedError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split())  # one line whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
