"""Backend implementations; :mod:`mindspeed_kernels.registry` lists them and picks one per call.

Each backend module exposes ``available() -> str | None`` and ``OPS: dict[str, Callable]``.
An implementation takes exactly the public op's arguments except ``backend``, already validated
by the op in :mod:`mindspeed_kernels.ops`.
"""
