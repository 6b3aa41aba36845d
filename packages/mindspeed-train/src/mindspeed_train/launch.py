"""`mindspeed train`: pretraining with the megatron-core backend, launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m mindspeed_train.launch --model ./qwen3-tiny \\
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 8 --seq-length 512 \\
        --train-iters 100 --lr 3e-4 --data-path data/corpus_text_document --save ckpt
    mindspeed train --nproc 2 ...        # the same: re-executes itself under torchrun

Launcher-only flags (not launch parameters of the seeds, so not in mindspeed-args):
``--model`` (a Hugging Face model directory or ``config.json``: the architecture to build; optional
when ``--load`` holds a checkpoint written by this command), ``--output-dir`` (metrics; default
``--save``), ``--save-total-limit N`` (keep the newest N checkpoints: the schema's
``save_total_limit`` has no megatron-dialect spelling), ``--nproc N``, ``--config FILE``. Everything else goes through
``mindspeed_args.validate(dialect="megatron")``; violations, and parameters set but not implemented
yet, stop the launch (exit 2) with the validator's messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from mindspeed_train import context
from mindspeed_train.config import TrainConfig

_HELP = """usage: mindspeed train --model HF_DIR_OR_CONFIG [--nproc N] [--output-dir DIR] [--config FILE] [MEGATRON FLAGS...]

Pretrain with the megatron-core backend (run under torchrun, or pass --nproc N to start it).

launcher flags:
  --model PATH       Hugging Face model directory or config.json (optional when --load holds a
                     checkpoint written by mindspeed train)
  --nproc N          re-execute under torchrun with N processes
  --output-dir DIR   where metrics.jsonl goes (default: --save)
  --config FILE      launch parameters from a file
  --save-total-limit N  keep only the newest N checkpoints under --save (default: all)

Every other flag is a megatron-dialect launch parameter, validated by mindspeed-args
(`mindspeed args show NAME`; the implemented ones: packages/mindspeed-train/README.md), e.g.
  --data-path PREFIX --seq-length 512 --micro-batch-size 1 --global-batch-size 8 --train-iters 100
  --lr 3e-4 --tensor-model-parallel-size 2 --save DIR --save-interval 50 --load DIR"""


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindspeed train", add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--nproc", type=int, default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--save-total-limit", default=None)
    return parser


def _save_total_limit(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--save-total-limit {text!r}: pass a whole number >= 1 (checkpoints to keep)")
    return int(text)


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, the rest: megatron-dialect flags for mindspeed-args)."""
    return _launcher_parser().parse_known_args(list(argv))


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _model_path(ours: argparse.Namespace, rest: list[str]) -> str:
    if ours.model:
        if not os.path.exists(ours.model):
            raise ValueError(f"--model {ours.model}: no such file or directory; pass a HF model directory or config.json")
        return ours.model
    load = _load_dir(rest)
    saved = os.path.join(load, "hf_config", "config.json") if load else None
    if saved and os.path.isfile(saved):
        return saved
    raise ValueError("--model is required (a Hugging Face model directory or config.json), unless --load holds "
                     "a checkpoint written by mindspeed train")  # fmt: skip


# The megatron dialect requires these model sizes (and its rules read num_experts); the HF config is
# their source: canonical name -> (flag, the HF keys that may hold it). Flags given anyway must agree.
MODEL_FLAGS = {
    "num_layers": ("--num-layers", ("num_hidden_layers",)),
    "hidden_size": ("--hidden-size", ("hidden_size",)),
    "num_attention_heads": ("--num-attention-heads", ("num_attention_heads",)),
    "max_position_embeddings": ("--max-position-embeddings", ("max_position_embeddings",)),
    "num_experts": ("--num-experts", ("num_experts", "num_local_experts", "n_routed_experts")),
}


def read_hf_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a model directory (or the file itself) as a dict."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--model {path}: cannot read {file} ({error}); pass a HF model directory or config.json") from None


def _hf_value(hf: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    return next(((key, hf[key]) for key in keys if hf.get(key) is not None), None)


def _with_model_flags(rest: list[str], hf: dict[str, Any]) -> list[str]:
    out = list(rest)
    for flag, keys in MODEL_FLAGS.values():
        found = _hf_value(hf, keys)
        if found and flag not in out and not any(a.startswith(flag + "=") for a in out):
            out += [flag, str(found[1])]
    return out


def _check_model_flags(cfg: Any, hf: dict[str, Any], model: str) -> None:
    for name, (flag, keys) in MODEL_FLAGS.items():
        found = _hf_value(hf, keys)
        if found and cfg.get(name) != found[1]:
            raise ValueError(f"{flag} {cfg.get(name)} disagrees with {found[0]}={found[1]} in --model {model}; drop the flag")


def _load_dir(rest: list[str]) -> str | None:
    """The value of --load in the megatron flags (read before validation: it may name the model)."""
    for i, arg in enumerate(rest):
        if arg == "--load" and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith("--load="):
            return arg.split("=", 1)[1]
    return None


def _values(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in params.items())


def build_config(argv: Sequence[str], world_size: int | None = None) -> TrainConfig:
    """Validate ``argv`` (megatron dialect) and build the run's TrainConfig. Raises ValueError with
    every violation when the launch is not valid. ``world_size``: the job's process count
    (default: this process group's, else ``WORLD_SIZE``)."""
    from mindspeed_args import validate
    from mindspeed_args.errors import UsageError

    world_size = _world_size() if world_size is None else world_size
    ours, rest = split_argv(argv)
    model = _model_path(ours, rest)
    hf = read_hf_config(model)
    try:
        report = validate(_with_model_flags(rest, hf), dialect="megatron", config=ours.config, world_size=world_size)
    except UsageError as error:  # unknown flag, a flag set twice, an unreadable --config
        raise ValueError(str(error)) from None
    if not report.ok:
        lines = [f"{_values(bad.params)}: {bad.constraint} ({bad.fix})" for bad in report.violations]
        raise ValueError("invalid launch:\n  " + "\n  ".join(lines))
    _check_model_flags(report.config, hf, model)
    config = TrainConfig.from_args(report.config, model=model, output_dir=ours.output_dir, world_size=world_size,
                                   save_total_limit=_save_total_limit(ours.save_total_limit))  # fmt: skip
    context.check(config, hf)
    _check_grid_layers(config)
    return config


def _check_grid_layers(config: TrainConfig) -> None:
    """The TP-2D and NDMM decoder layers cover dense GQA models only: refuse any other model here,
    before a process starts (the model spec alone, no weights or process groups)."""
    layout = config.parallel
    if not (layout.tp_2d or layout.nd_matmul):
        return
    import mindspeed_models as mm

    spec = mm.from_hf_config(config.model, tensor_model_parallel_size=layout.tensor, context_parallel_size=layout.context,
                             sequence_parallel=layout.sequence_parallel)  # fmt: skip
    if layout.tp_2d:
        from mindspeed_models.tp2d import check_tp2d_model

        check_tp2d_model(spec, layout.tp_x, layout.tp_y)
    else:
        from mindspeed_models.ndmm import check_ndmm_model

        check_ndmm_model(spec, layout.tensor)


def _init_distributed() -> None:
    """Join torchrun's process group (or a 1-rank group when launched directly)."""
    if dist.is_initialized():
        return
    from mindspeed_kernels import accelerator

    backend = accelerator.collective_backend()
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def _eod(config: TrainConfig, hf_config: dict) -> int:
    """End-of-document id: the tokenizer's EOS when --tokenizer-name-or-path is given, else the model's."""
    if config.tokenizer:
        from mindspeed_train.data.tokenizer import TokenizerSpec, eod_id, load_tokenizer

        return eod_id(load_tokenizer(TokenizerSpec(config.tokenizer)))
    eos = hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if not isinstance(eos, int):
        raise ValueError(f"--model {config.model}: no eos_token_id in the config; pass --tokenizer-name-or-path DIR")
    return eos


def train(argv: Sequence[str]) -> list:
    """Run one training job on this rank (collective over the process group). Returns this run's
    ``StepMetrics`` (every rank gets the same reduced losses)."""
    config = build_config(argv)  # before any process group or megatron import: bad input fails fast
    _init_distributed()
    from mindspeed_train import loop
    from mindspeed_train.data.loaders import build_loaders
    from mindspeed_train.metrics import MetricsLog

    loop.init_parallel(config)
    job = loop.build_job(config)
    loop.resume(job)
    train_data, valid_data, eval_iters = build_loaders(config, job, _eod(config, dict(job.spec.hf_config)))
    log = MetricsLog(config.output_dir, train_iters=config.train_iters, log_interval=config.log_interval,
                     enabled=dist.get_rank() == 0, tensorboard_dir=config.tensorboard_dir)  # fmt: skip
    return loop.run(job, train_data, log, valid_iterator=valid_data, eval_iters=eval_iters)


def _reexec_torchrun(nproc: int, argv: Sequence[str]) -> None:
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    rest = [a for a in rest if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "mindspeed_train.launch", *rest]
    os.execv(sys.executable, cmd)


def _shutdown() -> None:
    """megatron's parallel state first (its groups belong to the process group), then the group."""
    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mindspeed train` (and ``python -m mindspeed_train.launch``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(_HELP)
        return 0
    ours, _ = split_argv(argv)
    if ours.nproc is not None and "LOCAL_RANK" not in os.environ:
        if ours.nproc < 1:
            print("mindspeed train: --nproc must be >= 1", file=sys.stderr)
            return 2
        try:  # validate here, once, with the world the children will have: bad input never reaches torchrun
            build_config(argv, world_size=ours.nproc)
        except ValueError as error:
            print(f"mindspeed train: {error}", file=sys.stderr)
            return 2
        _reexec_torchrun(ours.nproc, argv)
    rank = int(os.environ.get("RANK", "0"))
    owned = not dist.is_initialized()  # a caller's process group (and megatron state) is left alone
    try:
        steps = train(argv)
    except ValueError as error:
        print(f"mindspeed train: {error}", file=sys.stderr)
        return 2
    finally:
        if owned:
            _shutdown()
    if steps and rank == 0:
        print(f"mindspeed train: done, iteration {steps[-1].iteration}, loss {steps[-1].loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
