"""Context parallelism (issue #7): attention over a sequence split across the ranks of a
caller-given process group.

- ``cp.ring``: ``megatron_cp_algo`` ring attention (zig-zag load balance, double ring,
  send/recv overlap, causal / general / no mask, packed TND).
- ``cp.ulysses`` / ``cp.all_to_all``: ``ulysses_cp_algo`` (sequence <-> head all-to-all, GQA
  kv-head repeat, packed TND).
- ``cp.hybrid``: ``hybrid_cp_algo``, ulysses inside ring, with its groups and data layout.
- ``cp.data``: splitting inputs across cp ranks (zig-zag, contiguous, packed) and gathering
  results back.
- ``cp.config``: ``CPConfig``, the algorithm and its options (MindSpeed's names), validated.
- ``cp.runtime``: what a training job calls: the sub-groups, the attention dispatch, and the
  global positions each rank holds.

Importing this package has no side effects; import the submodules you use.
"""
