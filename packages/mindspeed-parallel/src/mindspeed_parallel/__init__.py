"""mindspeed_parallel: parallel algorithms over caller-given process groups.

Subpackages (import what you use; importing has no side effects): ``cp`` (context parallelism:
ring, ulysses, hybrid, data splits, the per-job runtime), ``tp2d`` (2-D tensor parallelism),
``ndmm`` (NDMM linear layers), ``pipeline`` (DualPipe/DualPipeV executors and the schedule
simulator). See docs/parallel.md.
"""

from mindspeed_parallel._version import __version__

__all__ = ["__version__"]
