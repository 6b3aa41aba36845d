"""``mindspeed preprocess``: raw data -> Megatron indexed datasets (pretraining or instruction).

Flags follow MindSpeed-LLM's ``preprocess_data.py``. Without ``--handler-name`` the input is
pretraining text (``{prefix}_{key}_document``); with it, instruction data
(``{prefix}_packed_{input_ids,attention_mask,labels}_document``). Exit codes: 0 done,
2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from mindspeed_train.data.encode import LossMask
from mindspeed_train.data.handlers import HANDLERS, parse_map_keys
from mindspeed_train.data.templates import TEMPLATES
from mindspeed_train.data.tokenizer import TokenizerSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        raise SystemExit(_fail(f"{message} (see mindspeed preprocess --help)"))


def build_parser() -> argparse.ArgumentParser:
    """The ``mindspeed preprocess`` argument parser."""
    p = _Parser(prog="mindspeed preprocess", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("input / output")
    io.add_argument("--input", required=True, nargs="+", help="jsonl/json/parquet/text files or directories (comma lists ok)")
    io.add_argument("--output-prefix", required=True, help="output prefix; files are {prefix}_{key}_document.bin/.idx")
    io.add_argument("--json-keys", nargs="+", default=["text"], help="pretraining: record keys to tokenize (default text)")
    io.add_argument("--append-eod", action="store_true", help="pretraining: append the EOS id after every document")
    io.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any count)")
    io.add_argument("--log-interval", type=int, default=100, help="documents between progress-bar refreshes")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"])
    tk.add_argument("--tokenizer-name-or-path", required=True, help="local Hugging Face tokenizer directory")
    tk.add_argument("--tokenizer-padding-side", default="right", choices=["right", "left"])
    tk.add_argument("--tokenizer-not-use-fast", action="store_true", help="load the slow (Python) tokenizer")
    tk.add_argument("--extra-special-tokens", nargs="*", default=[], help="extra tokens added as special tokens")
    ins = p.add_argument_group("instruction data")
    ins.add_argument("--handler-name", choices=sorted(HANDLERS), help="instruction format; omit for pretraining text")
    ins.add_argument("--prompt-type", choices=sorted(TEMPLATES), help="prompt template")
    ins.add_argument("--hf-chat-template", action="store_true", help="use the tokenizer's own chat template")
    ins.add_argument("--map-keys", help='JSON column map, e.g. \'{"prompt": "question", "response": "answer"}\'')
    ins.add_argument("--seq-length", type=int, help="longest sample (cut unless --no-cut-token); pack length")
    ins.add_argument("--no-cut-token", action="store_true", help="drop samples longer than --seq-length instead of cutting")
    ins.add_argument("--pack", action="store_true", help="pack samples into sequences of at most --seq-length")
    ins.add_argument("--neat-pack", action="store_true", help="pack and record sample boundaries (no cross-sample attention)")
    ins.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    ins.add_argument("--mask-history", action="store_true", help="train only on the last reply of a conversation")
    return p


def _fail(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _job(args: argparse.Namespace):
    spec = TokenizerSpec(args.tokenizer_name_or_path, args.tokenizer_padding_side, tuple(args.extra_special_tokens),
                         use_fast=not args.tokenizer_not_use_fast)
    common = dict(inputs=tuple(args.input), output_prefix=args.output_prefix, tokenizer=spec, workers=args.workers,
                  log_interval=args.log_interval)
    if args.handler_name is None:
        from mindspeed_train.data.pretrain import PretrainJob, run_pretrain

        instruction_only = [f for f in ("prompt_type", "hf_chat_template", "map_keys", "pack", "neat_pack",
                                        "train_on_prompt", "mask_history", "no_cut_token") if getattr(args, f)]
        if instruction_only:
            raise ValueError(f"--{instruction_only[0].replace('_', '-')} needs --handler-name (instruction data)")
        return run_pretrain, PretrainJob(json_keys=tuple(args.json_keys), append_eod=args.append_eod, **common)
    from mindspeed_train.data.instruction import InstructionJob, run_instruction

    job = InstructionJob(handler_name=args.handler_name, prompt_type=args.prompt_type, hf_chat_template=args.hf_chat_template,
                         map_keys=parse_map_keys(args.map_keys), seq_length=args.seq_length, pack=args.pack,
                         neat_pack=args.neat_pack, no_cut_token=args.no_cut_token,
                         loss_mask=LossMask(args.train_on_prompt, args.mask_history), **common)
    return run_instruction, job


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mindspeed preprocess`` (and ``python -m mindspeed_train.data.cli``)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        run, job = _job(args)
        counts = run(job)
    except SystemExit as exc:  # --help, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else 0
    except (ValueError, TypeError, OSError, ImportError) as exc:
        return _fail(str(exc))
    summary = ", ".join(f"{k}={v}" for k, v in counts.items())
    print(f"preprocess: {summary}; wrote {args.output_prefix}_*_document.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
