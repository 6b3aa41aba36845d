"""Merge LoRA adapters into the base weights while exporting a Megatron checkpoint to HF.

``W' = W + scaling * B @ A`` with ``A`` [r, in], ``B`` [out, r] and ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), rounded as PEFT's ``merge_and_unload`` rounds on CPU
(:func:`merge_delta`).

Two adapter layouts:

- **HF PEFT** (``--lora-dir`` holding ``adapter_config.json`` + ``adapter_model.safetensors``):
  tensors ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<module>.weight``
  is an HF tensor of the exported model (per-expert MoE names such as
  ``model.layers.1.mlp.experts.3.gate_proj`` included); merged into that HF tensor after the
  name mapping. ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``, ``rank_pattern`` and
  ``alpha_pattern`` are read from the config.
- **Megatron** (Megatron-SWIFT / MindSpeed, PEFT-style names on megatron modules):
  ``<megatron module>.lora_A[.<adapter>].weight`` / ``.lora_B[.<adapter>].weight``, either next
  to the base weight in the checkpoint's own rank files or in a separate legacy checkpoint of
  the same TP/PP/EP layout (``--lora-dir`` with ``latest_checkpointed_iteration.txt``). Each
  adapter is TP-sharded like its base layer (column-parallel: ``A`` replicated, ``B`` split on
  dim 0; row-parallel: ``A`` split on dim 1, ``B`` replicated), so ``B_t @ A_t`` is exactly
  rank ``t``'s slice of the full update whatever the layer's row order (``linear_qkv`` groups,
  ``linear_fc1`` gate|up halves): the merge happens per rank shard, before the TP merge and
  the HF mapping. ``r`` comes from ``A``'s shape; ``alpha`` from ``--lora-alpha``, else the
  saved args (``lora_alpha``), else ``adapter_config.json`` / ``args.json`` in the adapter dir.

Every adapter tensor must be used: an adapter naming a tensor the model does not have, or of
the wrong shape, is a one-line ValueError naming the adapter file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.megatron_io import TRACKER, LegacyCheckpoint, args_get, chunks, locate
from mindspeed_ckpt.reader import McoreCheckpoint
from mindspeed_ckpt.sharding import EXPERT

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# <module>.lora_A.weight or <module>.lora_A.<adapter name>.weight (PEFT's in-memory spelling)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_B.bias")


def is_lora_key(name: str) -> bool:
    """Is ``name`` a LoRA adapter tensor (``.lora_A.`` / ``.lora_B.`` / DoRA / embedding LoRA)?"""
    return ".lora_A." in name or ".lora_B." in name or any(u in name for u in _UNSUPPORTED)


def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """``weight + scaling * (b @ a)`` (transposed for ``fan_in_fan_out``) in ``weight``'s dtype.
    weight [out, in] ([in, out] with fan_in_fan_out), a [r, in], b [out, r]; returns a new tensor.

    Rounding as PEFT's ``merge_and_unload`` on CPU: the product in float32, rounded to the
    adapter's dtype, then added in the wider of the two dtypes and rounded once to ``weight``'s
    (a float32 adapter on a bf16 weight rounds once; a bf16 adapter rounds its update first)."""
    delta = ((b.to(torch.float32) @ a.to(torch.float32)) * scaling).to(b.dtype)
    if fan_in_fan_out:
        delta = delta.T
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + delta.to(wide)).to(weight.dtype)


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _pairs(names: list[str], where: str) -> dict[str, dict[str, str]]:
    """module -> {"A": key, "B": key}; ValueError for unsupported or unpaired adapter tensors."""
    out: dict[str, dict[str, str]] = {}
    for n in names:
        if any(u in n for u in _UNSUPPORTED):
            raise ValueError(f"{where}: adapter tensor {n!r} is not supported (only plain LoRA A/B weights on linear "
                             "layers: no DoRA, LoRA bias or embedding LoRA)")
        m = _LORA_KEY.match(n)
        if m is None:
            raise ValueError(f"{where}: {n!r} is not a LoRA tensor name (<module>.lora_A.weight / .lora_B.weight)")
        out.setdefault(m["module"], {})[m["ab"]] = n
    for module, ab in out.items():
        if len(ab) != 2:
            raise ValueError(f"{where}: adapter for {module!r} has lora_{next(iter(ab))} but no lora_{'AB'[ab.keys() == {'A'}]}")
    return out


def _check_shapes(where: str, module: str, w: tuple[int, ...], a: torch.Tensor, b: torch.Tensor, r: int | None,
                  fan_in_fan_out: bool = False) -> None:
    out_f, in_f = (None, None) if len(w) != 2 else (w[1], w[0]) if fan_in_fan_out else (w[0], w[1])
    rank = a.shape[0] if a.dim() == 2 else None
    if (len(w) != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, rank)
            or (r is not None and rank != r)):
        raise ValueError(f"{where}: adapter for {module!r} does not fit its weight {list(w)}: lora_A {list(a.shape)}, "
                         f"lora_B {list(b.shape)} (expected [r, {in_f}] and [{out_f}, r]{f' with r={r}' if r else ''})")


@dataclass
class PeftAdapter:
    """An HF PEFT LoRA adapter directory, merged into HF tensors by :meth:`merge_hf`."""

    dir: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    pairs: dict[str, dict[str, str]]
    alpha: float | None = None  # --lora-alpha / --lora-rank override the config
    rank: int | None = None
    used: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, lora_dir: Path, alpha: float | None = None, rank: int | None = None) -> PeftAdapter:
        from safetensors import safe_open

        cfg = _read_json(lora_dir / PEFT_CONFIG) if (lora_dir / PEFT_CONFIG).is_file() else {}
        if cfg.get("use_dora"):
            raise ValueError(f"{lora_dir / PEFT_CONFIG}: use_dora is true; only plain LoRA adapters can be merged")
        path = lora_dir / PEFT_WEIGHTS
        if not path.is_file():
            raise ValueError(f"{path}: file not found (an HF PEFT adapter dir holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        if not cfg and alpha is None:
            raise ValueError(f"{lora_dir}: no {PEFT_CONFIG}; pass --lora-alpha (and --lora-rank) to merge the adapter")
        names = []
        for k in tensors:
            if not k.startswith(PEFT_PREFIX):
                raise ValueError(f"{path}: tensor {k!r} does not start with {PEFT_PREFIX!r} (not an HF PEFT LoRA adapter)")
            names.append(k[len(PEFT_PREFIX):])
        pairs = {m: {ab: PEFT_PREFIX + n for ab, n in d.items()} for m, d in _pairs(names, str(path)).items()}
        return cls(lora_dir, cfg, tensors, pairs, alpha, rank)

    def _params(self, module: str) -> tuple[int | None, float, bool]:
        r = self.rank or _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r"))
        alpha = self.alpha or _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha"))
        if alpha is None:
            raise ValueError(f"{self.dir / PEFT_CONFIG}: no lora_alpha; pass --lora-alpha")
        return r, float(alpha), bool(self.config.get("use_rslora"))

    def check(self, hf_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse adapters naming a tensor the export does not write, or of the wrong shape."""
        fan = bool(self.config.get("fan_in_fan_out"))
        for module, ab in self.pairs.items():
            shape = hf_shapes.get(module + ".weight")
            if shape is None:
                raise ValueError(f"{self.dir / PEFT_WEIGHTS}: adapter targets {module + '.weight'!r}, which this model "
                                 "(config.json) does not have; check the adapter belongs to this model")
            r = self._params(module)[0]
            _check_shapes(str(self.dir / PEFT_WEIGHTS), module, tuple(shape), self.tensors[ab["A"]], self.tensors[ab["B"]],
                          r, fan)

    def merge_hf(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (HF tensor ``hf_name``) with its adapter merged, or ``t`` when it has none."""
        module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
        ab = self.pairs.get(module) if module else None
        if ab is None:
            return t
        r, alpha, rslora = self._params(module)
        a = self.tensors[ab["A"]]
        self.used.add(module)
        return merge_delta(t, a, self.tensors[ab["B"]], _scaling(alpha, r or a.shape[0], rslora),
                           bool(self.config.get("fan_in_fan_out")))

    def finish(self) -> None:
        left = sorted(set(self.pairs) - self.used)
        if left:
            raise ValueError(f"{self.dir / PEFT_WEIGHTS}: adapter for {left[0]!r} was not merged ({len(left)} in all)")


def _scan(legacy: LegacyCheckpoint) -> dict[tuple[int, int, int, int], dict[str, dict[str, str]]]:
    """(stage, chunk, tp rank, ep rank) -> module -> {"A", "B"} keys of the LoRA tensors in ``legacy``'s rank files."""
    out = {}
    for s in range(legacy.pp):
        for t in range(legacy.tp):
            for e in range(legacy.ep):
                for c, sd in enumerate(chunks(legacy.load(t, s, e))):
                    names = [k for k in sd if is_lora_key(k)]
                    if names:
                        out[(s, c, t, e)] = _pairs(names, str(legacy.path(t, s, e)))
    return out


def _megatron_alpha(lora_dir: Path | None, args: Any, alpha: float | None) -> tuple[float, bool]:
    """(alpha, use_rslora): --lora-alpha, else the saved args, else adapter_config.json / args.json in the adapter dir."""
    found = {"lora_alpha": alpha, "use_rslora": None}
    for key in found:
        if found[key] is None:
            found[key] = args_get(args, key)
    for name in (PEFT_CONFIG, "args.json"):
        if lora_dir is not None and (lora_dir / name).is_file():
            data = _read_json(lora_dir / name)
            for key in found:
                if found[key] is None:
                    found[key] = data.get(key)
    if found["lora_alpha"] is None:
        raise ValueError(f"{lora_dir or 'the checkpoint'}: Megatron LoRA adapters found but no lora_alpha in the saved args "
                         f"or {PEFT_CONFIG}/args.json; pass --lora-alpha")
    return float(found["lora_alpha"]), bool(found["use_rslora"])


@dataclass
class MegatronLora:
    """Megatron LoRA adapters merged shard by shard while :class:`McoreCheckpoint` reads the base
    (through its ``shard_hook``). ``source``: a separate adapter checkpoint, or None when the
    adapters sit in the base rank files."""

    ck: McoreCheckpoint
    source: LegacyCheckpoint | None
    pairs: dict[tuple[int, int, int, int], dict[str, dict[str, str]]]
    alpha: float
    rslora: bool
    rank: int | None = None
    used: set[tuple[int, int, int, int, str]] = field(default_factory=set)
    _files: dict[tuple[int, int, int], list[Mapping[str, Any]]] = field(default_factory=dict)  # adapter files, mapped

    def _where(self, s: int, t: int, e: int) -> str:
        return str((self.source or self.ck.legacy).path(t, s, e))

    def _adapter(self, s: int, c: int, t: int, e: int, base: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.source is None:
            return base
        if (t, s, e) not in self._files:  # adapters are small: keep each file mapped once loaded
            self._files[(t, s, e)] = chunks(self.source.load(t, s, e))
        return self._files[(t, s, e)][c]

    def check(self) -> None:
        """Every adapter must sit on a base weight of the same rank file and fit its shard."""
        for (s, c, t, e), mods in self.pairs.items():
            base = chunks(self.ck.legacy.load(t, s, e))
            if c >= len(base):
                raise ValueError(f"{self._where(s, t, e)}: adapter model chunk {c} but the base holds {len(base)} chunks")
            sd = self._adapter(s, c, t, e, base[c])
            for module, ab in mods.items():
                w = base[c].get(module + ".weight")
                if not isinstance(w, torch.Tensor):
                    raise ValueError(f"{self._where(s, t, e)}: adapter targets {module + '.weight'!r}, which the base "
                                     f"checkpoint's rank file does not have; check the adapter belongs to this checkpoint")
                _check_shapes(self._where(s, t, e), module, tuple(w.shape), sd[ab["A"]], sd[ab["B"]], self.rank)

    def hook(self, s: int, c: int, t: int, e: int, local: str, shard: torch.Tensor, base: Mapping[str, Any]) -> torch.Tensor:
        """The reader's shard hook: ``shard`` (base ``local`` of rank file (t, s, e), chunk c) plus its update."""
        module = local[: -len(".weight")] if local.endswith(".weight") else None
        ab = self.pairs.get((s, c, t, e), {}).get(module) if module else None
        if ab is None:
            return shard
        sd = self._adapter(s, c, t, e, base)
        a, b = sd[ab["A"]], sd[ab["B"]]
        self.used.add((s, c, t, e, module))
        return merge_delta(shard, a, b, _scaling(self.alpha, a.shape[0], self.rslora))

    def merge_hf(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        return t  # merged before the HF mapping, in hook()

    def finish(self) -> None:
        # the reader reads EP rank 0's copy of non-expert tensors and skips tied / MTP copies
        left = sorted((s, c, t, e, m) for (s, c, t, e), mods in self.pairs.items() for m in mods
                      if (s, c, t, e, m) not in self.used and (e == 0 or EXPERT in m + "."))
        if left:
            s, c, t, e, m = left[0]
            raise ValueError(f"{self._where(s, t, e)}: adapter for {m!r} (chunk {c}) was not merged: its base weight is "
                             f"a copy megatron keeps of another tensor ({len(left)} in all)")


def hf_shapes(ck: McoreCheckpoint) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor ``mcore_to_hf`` writes for ``ck``."""
    out = {}
    for r in maps.rules(ck.hf_config, padded_vocab_size=ck.padded_vocab_size):
        if not (r.alias and r.optional):
            out.update(zip(r.hf, (tuple(s) for s in r.hf_shapes), strict=True))
    return out


def open_lora(ck: McoreCheckpoint, lora_dir: str | os.PathLike | None = None, *, alpha: float | None = None,
              rank: int | None = None) -> PeftAdapter | MegatronLora | None:
    """The adapter to merge while exporting ``ck``: HF PEFT or Megatron layout found in
    ``lora_dir``, else Megatron adapters inside ``ck``'s own rank files, else None. Megatron
    adapters are attached to ``ck`` (its reader merges them); call ``merge_hf`` on every HF
    tensor written and ``finish`` at the end. ValueError (one line) for a bad adapter."""
    if lora_dir is None:
        pairs = _scan(ck.legacy)
        if not pairs:
            if alpha is not None or rank is not None:
                raise ValueError("--lora-alpha/--lora-rank given but no adapter: pass --lora-dir")
            return None
        source, where = None, None
    else:
        where = Path(lora_dir)
        if not where.is_dir():
            raise ValueError(f"--lora-dir {where}: not a directory")
        if (where / PEFT_WEIGHTS).is_file() or (where / PEFT_CONFIG).is_file():
            peft = PeftAdapter.open(where, alpha, rank)
            peft.check(hf_shapes(ck))
            return peft
        if not (where / TRACKER).is_file():
            raise ValueError(f"--lora-dir {where}: neither an HF PEFT adapter ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a "
                             f"megatron checkpoint ({TRACKER})")
        source = locate(where)
        if (source.tp, source.pp, source.ep) != (ck.tp, ck.pp, ck.ep):
            raise ValueError(f"--lora-dir {where}: adapters saved at TP={source.tp} PP={source.pp} EP={source.ep} but the "
                             f"base checkpoint is TP={ck.tp} PP={ck.pp} EP={ck.ep}; they must match")
        pairs = _scan(source)
        if not pairs:
            raise ValueError(f"--lora-dir {where}: no lora_A/lora_B tensors in its rank files")
    args = (source or ck.legacy).load(0, 0).get("args")
    lora_alpha, rslora = _megatron_alpha(where, args, alpha)
    merger = MegatronLora(ck, source, pairs, lora_alpha, rslora, rank)
    merger.check()
    ck.skip_key, ck.shard_hook = is_lora_key, merger.hook
    return merger
