"""Where each full-model megatron-core tensor lives in a TP x PP x VPP x EP legacy checkpoint.

Pipeline: decoder layers are cut into ``pp * vpp`` model chunks. Chunk ``c`` of stage ``s`` is
the ``c * pp + s``-th block of layers in model order (megatron's interleaved assignment); with
``vpp = 1`` the per-stage counts may be uneven (``--num-layer-list`` or megatron's
``--decoder-first/last-pipeline-num-layers``). Layers are renumbered from 0 in every chunk.
The embedding lives in the first chunk; ``final_layernorm``, ``output_layer`` and the MTP
layers (``mtp.layers.K``) in the last one. When the last chunk is not the first, it also keeps
its own copy of the embedding if the model has MTP layers (megatron's MTP block embeds the
shifted tokens there) and its own ``output_layer.weight`` if embeddings are tied (megatron
allocates one on the last stage).

Noop layers (MindSpeed's ``--noop-layers``, megatron layer indices): pass-through layers with no
weights that pad the layer count for an even pipeline split; model layer ``i`` is the ``i``-th
megatron layer that is not a noop one.

Experts (ETP = 1): routed expert ``E`` of a layer lives on EP rank ``E // (experts / ep)`` as
local expert ``E % (experts / ep)``; every other tensor is on every EP rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*?mlp\.experts\.local_experts\.)(\d+)\.(.*)$")
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class Slot:
    """One tensor's place: pipeline stage, model chunk (VPP index), EP rank (None: every EP
    rank), its name in that chunk's state dict, and whether it is a copy of a tensor that
    lives elsewhere too (skipped when reading)."""

    stage: int
    chunk: int
    ep_rank: int | None
    local: str
    copy: bool = False


def stage_layer_counts(num_layers: int, pp: int, *, layer_list: tuple[int, ...] | None = None,
                       first: int | None = None, last: int | None = None) -> tuple[int, ...]:
    """Decoder layers per pipeline stage: an explicit ``layer_list`` (``--num-layer-list``),
    megatron's ``first`` / ``last`` stage counts with the rest spread evenly over the middle
    stages, or an even split. ValueError names the flag to fix."""
    if pp < 1:
        raise ValueError(f"--pp must be >= 1; got {pp}")
    if layer_list is not None:
        if first is not None or last is not None:
            raise ValueError("--num-layer-list cannot be combined with --decoder-first/last-pipeline-num-layers")
        if len(layer_list) != pp or sum(layer_list) != num_layers or min(layer_list) < 1:
            raise ValueError(f"--num-layer-list {','.join(map(str, layer_list))} must hold {pp} positive counts (one per "
                             f"--pp stage) summing to num_hidden_layers={num_layers}")
        return tuple(layer_list)
    ends = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in ends) or (ends and pp == 1):
        raise ValueError("--decoder-first/last-pipeline-num-layers must be >= 1 and need --pp > 1")
    middle_stages = pp - len(ends)
    rest = num_layers - sum(ends)
    if (middle_stages == 0 and rest != 0) or (middle_stages and (rest < middle_stages or rest % middle_stages)):
        flags = "--decoder-first/last-pipeline-num-layers" if ends else f"--pp {pp}"
        raise ValueError(f"{flags}: cannot place num_hidden_layers={num_layers} on {pp} stages "
                         f"({rest} layers left for {middle_stages} middle stages); pick sizes that divide evenly")
    per = rest // middle_stages if middle_stages else 0
    counts = [per] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return tuple(counts)


@dataclass(frozen=True)
class Grid:
    """Placement of a model over ``pp`` stages x ``vpp`` chunks x ``ep`` expert ranks.

    counts: decoder layers per stage (length pp); experts: routed experts per MoE layer (0 for
    dense); mtp: MTP layers; tied: embeddings shared with the output layer.
    """

    counts: tuple[int, ...]
    vpp: int = 1
    ep: int = 1
    experts: int = 0
    mtp: int = 0
    tied: bool = False
    noop: tuple[int, ...] = ()

    def __post_init__(self):
        n = sum(self.counts)
        if len(set(self.noop)) != len(self.noop) or any(not 0 <= i < n for i in self.noop) or len(self.noop) >= n:
            raise ValueError(f"--noop-layers {','.join(map(str, self.noop))}: distinct megatron layer indices in "
                             f"0..{n - 1}, fewer than the {n} layers")
        if self.vpp < 1 or (self.vpp > 1 and (len(set(self.counts)) > 1 or self.counts[0] % self.vpp)):
            raise ValueError(f"--vpp {self.vpp} needs the same number of layers on every stage, divisible by it "
                             f"(stages hold {list(self.counts)} of num_hidden_layers={n})")
        if self.ep < 1 or (self.ep > 1 and (self.experts == 0 or self.experts % self.ep)):
            what = f"the {self.experts} experts" if self.experts else "a dense model (no experts)"
            raise ValueError(f"--ep {self.ep} must divide the number of experts; {what} cannot be split so")

    @property
    def pp(self) -> int:
        return len(self.counts)

    @property
    def real_layers(self) -> tuple[int, ...]:
        """Megatron layer index of each model layer (HF index order): every index but the noop ones."""
        return tuple(i for i in range(sum(self.counts)) if i not in self.noop)

    def chunk_range(self, stage: int, chunk: int) -> range:
        """Global indices of the decoder layers in chunk ``chunk`` of stage ``stage``."""
        if self.vpp == 1:
            start = sum(self.counts[:stage])
            return range(start, start + self.counts[stage])
        per = self.counts[0] // self.vpp
        start = (chunk * self.pp + stage) * per
        return range(start, start + per)

    def _layer_slot(self, i: int) -> tuple[int, int, int]:
        for s in range(self.pp):
            for c in range(self.vpp):
                r = self.chunk_range(s, c)
                if i in r:
                    return s, c, i - r.start
        raise ValueError(f"megatron tensor for decoder layer {i}: the model has only {sum(self.counts)} layers")

    def _expert(self, local: str) -> tuple[int | None, str]:
        m = _EXPERT.match(local)
        if m is None:
            return None, local
        per = self.experts // self.ep
        e = int(m.group(2))
        return e // per, f"{m.group(1)}{e % per}.{m.group(3)}"

    def place(self, name: str) -> list[Slot]:
        """The slots holding full-model tensor ``name``, the owning one first."""
        last = (self.pp - 1, self.vpp - 1)
        m = _LAYER.match(name)
        if m is not None:
            real = self.real_layers
            layer = int(m.group(1))
            if layer >= len(real):
                raise ValueError(f"megatron tensor for decoder layer {layer}: the model has only {len(real)} layers")
            s, c, i = self._layer_slot(real[layer])
            ep_rank, rest = self._expert(m.group(2))
            return [Slot(s, c, ep_rank, f"decoder.layers.{i}.{rest}")]
        if name.startswith(("mtp.", "decoder.final_layernorm.", "output_layer.")):
            ep_rank, local = self._expert(name)
            return [Slot(*last, ep_rank, local)]
        if name.startswith("embedding."):
            out = [Slot(0, 0, None, name)]
            if last != (0, 0) and name == EMBEDDING:
                if self.mtp:
                    out.append(Slot(*last, None, name, copy=True))
                if self.tied:
                    out.append(Slot(*last, None, OUTPUT, copy=True))
            return out
        raise ValueError(f"megatron tensor {name!r}: no pipeline stage known for it")

    def global_name(self, stage: int, chunk: int, ep_rank: int, local: str) -> str | None:
        """Inverse of :meth:`place` for a name found in a rank file; None for a copy."""
        last = (stage, chunk) == (self.pp - 1, self.vpp - 1)
        if local == OUTPUT and self.tied:
            return None
        if local == EMBEDDING and (stage, chunk) != (0, 0):
            return None
        m = _EXPERT.match(local)
        if m is not None:
            per = self.experts // self.ep if self.experts else 0
            e = int(m.group(2))
            if per and e >= per:
                raise ValueError(f"local expert {e} found but EP ranks hold {per} experts each")
            local = f"{m.group(1)}{ep_rank * per + e}.{m.group(3)}"
        m = _LAYER.match(local)
        if m is None:
            if not last and local.startswith(("mtp.", "decoder.final_layernorm.", "output_layer.")):
                raise ValueError(f"{local!r} found in stage {stage} chunk {chunk}, but it belongs to the last one")
            return local
        r = self.chunk_range(stage, chunk)
        i = int(m.group(1))
        if i >= len(r):
            raise ValueError(f"stage {stage} chunk {chunk} holds layer {i} but should hold {len(r)} layers")
        if r.start + i in self.noop:
            raise ValueError(f"stage {stage} chunk {chunk} holds tensors for layer {r.start + i}, a noop layer")
        return f"decoder.layers.{self.real_layers.index(r.start + i)}.{m.group(2)}"
