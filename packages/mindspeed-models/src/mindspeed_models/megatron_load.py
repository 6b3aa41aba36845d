"""Megatron checkpoint directories for :func:`mindspeed_models.load_pretrained`.

Two formats, both with the model's Hugging Face ``config.json`` in ``DIR/hf_config/`` (where
``mindspeed convert hf-to-mcore`` puts it, with the tokenizer files):

- **legacy** (``iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``, any TP x PP x VPP x EP):
  streamed by :func:`mindspeed_ckpt.read_mcore` one pipeline stage at a time, each tensor merged
  to its full (TP=1) shape and copied into the model, so host memory holds one stage's mapped
  files plus the model;
- **torch_dist** (``iter_N/metadata.json`` + ``*.distcp``, torch.distributed.checkpoint): read by
  megatron-core's own ``dist_checkpointing.load`` into the model's sharded state dict, whatever
  TP/PP it was saved with.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch

from mindspeed_models.config import from_hf_config, read_hf_config, without_absent_mtp
from mindspeed_models.model import build_model

__all__ = ["HF_CONFIG_DIR", "TRACKER", "is_megatron_dir", "load_megatron"]

TRACKER = "latest_checkpointed_iteration.txt"
HF_CONFIG_DIR = "hf_config"


def is_megatron_dir(path: Path) -> bool:
    """Whether ``path`` looks like a Megatron checkpoint (tracker file or ``iter_*`` / ``release`` directories)."""
    return (path / TRACKER).is_file() or (path / "release").is_dir() or any(path.glob("iter_*"))


def iteration_dir(path: Path) -> Path:
    """The directory ``latest_checkpointed_iteration.txt`` names (``iter_0000010`` or ``release``)."""
    tracker = path / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(f"load_pretrained: {tracker} is missing; pass the checkpoint's top directory")
    text = tracker.read_text(encoding="utf-8").strip()
    if text != "release" and not text.isdigit():
        raise ValueError(f"load_pretrained: {tracker} holds {text[:40]!r}; expected an iteration number or 'release'")
    step = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not step.is_dir():
        raise FileNotFoundError(f"load_pretrained: {step} (named by {TRACKER}) is missing")
    return step


def load_megatron(path: Path, *, dtype: torch.dtype, overrides: dict):
    """(model in eval mode, spec) from the Megatron checkpoint ``path``; see the module docstring."""
    config_dir = path / HF_CONFIG_DIR
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"load_pretrained: {config_dir}/config.json is missing; copy the model's Hugging Face config.json there "
            "(mindspeed convert hf-to-mcore writes it)"
        )
    step = iteration_dir(path)
    overrides = {"params_dtype": dtype, "perform_initialization": False, **overrides}
    if (step / "metadata.json").is_file():
        return _load_torch_dist(step, config_dir, overrides)
    return _load_legacy(path, config_dir, overrides)


def _load_legacy(path: Path, config_dir: Path, overrides: dict):
    if importlib.util.find_spec("mindspeed_ckpt") is None:
        raise ImportError("load_pretrained needs mindspeed-ckpt to read Megatron legacy checkpoints: "
                          "pip install 'mindspeed-models[hf]'")  # fmt: skip
    from mindspeed_ckpt import read_mcore

    ck = read_mcore(path, config_dir)
    names = set(ck.names())
    # Megatron pads the vocabulary; the model must have exactly the saved number of rows.
    overrides = {"make_vocab_size_divisible_by": ck.padded_vocab_size, **overrides}
    spec = from_hf_config(ck.hf_config, **overrides)
    if spec.padded_vocab_size != ck.padded_vocab_size:
        raise ValueError(f"load_pretrained: {path} has {ck.padded_vocab_size} embedding rows but "
                         f"make_vocab_size_divisible_by gives {spec.padded_vocab_size}; leave it unset")  # fmt: skip
    spec = without_absent_mtp(spec, "mtp.layers.0.eh_proj.weight" in names, overrides, path)
    model = build_model(spec)
    copy_streamed(model, ck.tensors(), path)
    return model.eval(), spec


def copy_streamed(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], where: Path) -> None:
    """Copy (name, full tensor) pairs into ``model``'s state one at a time; ValueError naming the first
    unexpected, misshapen or missing tensor (``_extra_state`` entries may be absent)."""
    own = model.state_dict(keep_vars=True)
    needed = {k for k in own if not k.endswith("_extra_state")}
    with torch.no_grad():
        for name, tensor in tensors:
            target = own.get(name)
            if target is None:
                raise ValueError(f"load_pretrained: {where} holds {name!r}, which the model built from its config.json lacks")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"load_pretrained: {where}: {name!r} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(target.shape)}")  # fmt: skip
            target.copy_(tensor)
            needed.discard(name)
    if needed:
        missing = sorted(needed)
        raise ValueError(f"load_pretrained: {where} lacks {missing[0]!r} ({len(missing)} tensors in all) for its config.json")


def _load_torch_dist(step: Path, config_dir: Path, overrides: dict):
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(step))
        rows = meta["embedding.word_embeddings.weight"].global_shape[0]
    except Exception as exc:  # megatron raises assorted types; say which directory and why, in one line
        raise ValueError(f"load_pretrained: {step} is not a readable torch_dist checkpoint ({_first_line(exc)})") from None
    overrides = {"make_vocab_size_divisible_by": rows, **overrides}
    spec = from_hf_config(read_hf_config(config_dir), **overrides)
    spec = without_absent_mtp(spec, "mtp.layers.0.eh_proj.weight" in meta, overrides, step)
    model = build_model(spec)
    try:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(step))
    except Exception as exc:
        raise ValueError(f"load_pretrained: {step} does not load into the model built from {config_dir}/config.json "
                         f"({_first_line(exc)})") from None  # fmt: skip
    # The returned dict also carries the checkpoint's common state (iteration, args, a training
    # run's optimizer/scheduler entries): keep the model's own keys, all of which must be there.
    own = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in loaded.items() if k in own})
    return model.eval(), spec


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
