"""TP-2D: tensor parallelism over a ``tp_x x tp_y`` grid (seed flags ``--tp-2d --tp-x --tp-y``).

A TP group of ``tp = tp_x * tp_y`` ranks is split into x groups (``tp_x`` consecutive ranks) and
y groups (stride ``tp_x``) by `make_tp2d_groups`. Activations are split on both axes, so each
linear layer all-gathers over one group of the grid and reduce-scatters over the other instead
of all-reducing over the whole TP group.

How a transformer layer is laid out (S = sequence (already divided by CP), B = batch, H = hidden,
F = FFN hidden, N = heads, D = head dim; ``[S/x, B, H/y]`` = rows split over the x group, columns
over the y group)::

    residual stream, norms        [S/x, B, H/y]    RMSNorm2D/LayerNorm2D(group=y, grad_reduce_group=x)
    MLP  fc1 (ag=x, rs=y)         [S/x, B, H/y] -> [S/y, B, F/x]    (gate and up: F = 2 * ffn)
         activation               elementwise on [S/y, B, F/x]      (SwiGLU needs gate/up blocks
                                                                     interleaved per x rank in W_fc1)
         fc2 (ag=y, rs=x)         [S/y, B, F/x] -> [S/x, B, H/y]
    attention qkv (ag=x, rs=y)    [S/x, B, H/y] -> [S/y, B, 3H/x]   (heads split over x: N/x per rank)
         core attention           needs all S of a head: all-gather over the y group (or run it as
                                  CP over "y x CP", MindSpeed's tp-y-cp group) on N/x heads
         proj (ag=y, rs=x)        [S/y, B, H/x] -> [S/x, B, H/y]

The layer input and output share the residual layout, so layers chain; embeddings and the output
layer convert with `split_2d` / `gather_2d`. Wiring these into a model (QKV/gate-up weight
orders, the attention all-gather) is the model package's job; this package provides the layers:

- `ParallelLinear2D` / `linear_2d` (with the three overlap options of `TP2DOverlap`),
- `RMSNorm2D` / `LayerNorm2D` (statistics all-reduced over the hidden group),
- `split_2d`, `gather_2d`, `shard_2d`, `shard_linear_2d` for layouts and checkpoints.

Not combinable with sequence parallelism (the sequence is already split) — as in MindSpeed.
"""

from __future__ import annotations

from mindspeed_parallel.tp2d.groups import Grid2D, TP2DGroups, make_tp2d_groups
from mindspeed_parallel.tp2d.layout import gather_2d, shard_2d, split_2d
from mindspeed_parallel.tp2d.linear import ParallelLinear2D, TP2DOverlap, linear_2d, shard_linear_2d
from mindspeed_parallel.tp2d.norm import LayerNorm2D, RMSNorm2D, layer_norm_2d, rms_norm_2d

__all__ = [
    "Grid2D",
    "LayerNorm2D",
    "ParallelLinear2D",
    "RMSNorm2D",
    "TP2DGroups",
    "TP2DOverlap",
    "gather_2d",
    "layer_norm_2d",
    "linear_2d",
    "make_tp2d_groups",
    "rms_norm_2d",
    "shard_2d",
    "shard_linear_2d",
    "split_2d",
]
