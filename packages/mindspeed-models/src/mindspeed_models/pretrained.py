"""``load_pretrained(path)``: a Hugging Face model directory (or a Megatron checkpoint) as a ready megatron-core model.

Weights are read lazily from ``model.safetensors`` or the shards named by
``model.safetensors.index.json`` and renamed by ``mindspeed_ckpt.maps.hf_to_mcore`` (the
optional ``hf`` extra: ``pip install 'mindspeed-models[hf]'``). Megatron directories: see
:mod:`mindspeed_models.megatron_load`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.models.gpt import GPTModel

from mindspeed_models import megatron_load
from mindspeed_models.config import ModelSpec, from_hf_config, without_absent_mtp
from mindspeed_models.model import build_model, logits

__all__ = ["PretrainedModel", "SafetensorsDir", "load_pretrained"]

@dataclass(frozen=True)
class PretrainedModel:
    """A loaded model: ``model`` (megatron GPTModel, eval mode), ``spec`` and the source ``path``."""

    model: GPTModel
    spec: ModelSpec
    path: Path

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, S, V]`` float32 logits for ``input_ids`` [B, S], without autograd (see :func:`mindspeed_models.logits`)."""
        with torch.no_grad():
            return logits(self.model, input_ids, attention_mask)


class SafetensorsDir(Mapping):
    """The tensors of an HF directory by name, each read from its file only when asked for.

    Use as a context manager (or call :meth:`close`) to close the open files.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        self._files = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r}); re-save the model") from None
            self._where = {str(name): str(file) for name, file in weight_map.items()}
        elif single.is_file():
            self._where = dict.fromkeys(self._handle(single.name).keys(), single.name)
        else:
            raise FileNotFoundError(
                f"{self.directory}: no model.safetensors or model.safetensors.index.json; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )

    def _handle(self, file: str):
        if file not in self._handles:
            # safetensors comes with the ``hf`` extra (mindspeed-ckpt depends on it), so import it here.
            from safetensors import safe_open

            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in the safetensors index but missing")
            self._handles[file] = self._files.enter_context(safe_open(path, framework="pt"))
        return self._handles[file]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Close every file opened so far."""
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **overrides) -> PretrainedModel:
    """Load the Hugging Face model directory ``path`` (config.json + safetensors) into a megatron GPTModel.

    ``dtype``: parameter dtype (default float32, what logits comparisons use); ``overrides``: as
    :func:`mindspeed_models.from_hf_config`. World size 1 is fine: a one-rank process group and
    megatron's parallel state are created when none exists. A Megatron checkpoint directory
    (legacy or torch_dist, with the HF config in ``path/hf_config/``) is read by
    :mod:`mindspeed_models.megatron_load`. Returns a :class:`PretrainedModel` in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_pretrained: {path} is not a directory; pass a Hugging Face model directory")
    if not (path / "config.json").is_file() and megatron_load.is_megatron_dir(path):
        model, spec = megatron_load.load_megatron(path, dtype=dtype, overrides=overrides)
        return PretrainedModel(model=model, spec=spec, path=path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_pretrained: {path}/config.json is missing; pass a Hugging Face model directory")
    maps = _ckpt_maps()
    overrides = {"params_dtype": dtype, "perform_initialization": False, **overrides}
    with SafetensorsDir(path) as tensors:
        spec = from_hf_config(path, **overrides)
        # DeepSeek's Hub layout: MTP layer k is checkpoint layer num_hidden_layers + k.
        present = f"model.layers.{spec.config.num_layers}.eh_proj.weight" in tensors
        spec = without_absent_mtp(spec, present, overrides, path)
        model = build_model(spec)
        state = maps.hf_to_mcore(dict(spec.hf_config), tensors, padded_vocab_size=spec.padded_vocab_size)
        load_state(model, state)
    model.eval()
    return PretrainedModel(model=model, spec=spec, path=path)


def _ckpt_maps():
    # mindspeed-ckpt is an optional dependency (the ``hf`` extra), imported only here.
    if importlib.util.find_spec("mindspeed_ckpt") is None:
        raise ImportError("load_pretrained needs mindspeed-ckpt to read Hugging Face weights: pip install 'mindspeed-models[hf]'")
    from mindspeed_ckpt import maps

    return maps


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (a full megatron state dict) into ``model``; ValueError naming missing/extra/misshapen tensors.

    ``_extra_state`` entries (megatron's TransformerEngine placeholders) may be absent.
    """
    own = model.state_dict()
    needed = {k for k in own if not k.endswith("_extra_state")}
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in needed & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if problems:
        raise ValueError(f"checkpoint does not fit the model built from config.json ({'; '.join(problems)})")
    model.load_state_dict(dict(state), strict=False)
