"""The megatron-core 0.16 device adaptor: ``install(device)`` makes megatron-core run on the
device in use — NPU (CUDA calls mapped to torch_npu's), CUDA (nothing to do) or CPU (gloo).

megatron-core assumes CUDA at a known set of seams: ``torch.cuda.current_device()`` allocations,
the CUDA RNG tracker, streams, events, ``device="cuda"`` literals, ``.cuda()`` and
``tensor.type() == 'torch.cuda.FloatTensor'`` checks in the optimizer, plus a few traps met off
CUDA (no apex/TE). `seams.SEAMS` is THE table of the call sites adapted; `install` applies
exactly those rows and nothing else:

- each listed module's global ``torch`` is rebound to a thin module whose ``.cuda`` is the
  device's shim (`cpu.CpuCuda`, `npu.NpuCuda`) and whose other attributes are torch's own — torch
  itself, and every module not listed, is untouched;
- ``device="cuda"`` literals, ``tensor.type()`` strings and ``.cuda()`` are rewritten in the code
  objects of the listed functions (same bytecode, no runtime cost);
- a few functions/class attributes are replaced (`cpu.REPLACEMENTS`, `npu.REPLACEMENTS`), and on
  CPU one expected megatron warning is filtered (`cpu.LOG_FILTERS`). Some rows are for speed, not
  correctness. On CPU, for a one-rank TP group: megatron's TP-region functions return their input
  instead of building an identity autograd node, and the vocab-parallel cross-entropy skips its
  three identity all-reduces (their Python and gloo round trips are on the critical path). On CPU
  and NPU, where apex/TE are absent: megatron's Python-loop stand-ins for apex's multi-tensor L2
  norm and scale (grad norm, clipping, main-to-model copies) become torch's ``_foreach`` ops.

This is targeted on purpose: a global catch-all (a ``TorchFunctionMode`` rewriting every
``cuda`` device, or patching ``torch.cuda.*`` process-wide) was ~1.5-2x slower on small models,
must be re-entered for backward, and changes torch for everyone.

Import order: `install` imports the listed megatron-core modules itself and patches them, so it
may run before or after ``import megatron.core`` — every seam is looked up at call time.
(Objects megatron created *before* install keep what they captured, e.g. an alltoall dispatcher's
side stream, so build models after install.) One device per process: a second call with the same
device is a no-op, with another one a ``ValueError``. On CUDA nothing is patched.

Non-CUDA traps handled: WrappedTorchNorm under sequence parallelism (the local spec without apex),
``moe_utils.te_general_gemm`` unbound without TE, alltoall split sizes left as tensors, torch_dist
checkpoint writers that need psutil (they die without it and the save hangs), and, on gloo only,
batched PP p2p that swaps messages between two ranks. Not handled: MoE with EP=ETP=TP=1 and
``add_bias_linear=True`` fails in place on a view at transformer/mlp.py:247 on every device (use
bias off or EP>1); *async* ``dist_checkpointing`` saves start a spawn-context Manager that
re-imports ``__main__`` (entry scripts need a main guard; do not end ranks with ``os._exit``);
``exchange_utils`` (fully parallel save/load) keeps ``device="cuda"`` literals; MLA without TE
needs its own core attention (mindspeed_models' specs); CUDA graphs, graph-safe RNG states,
``torch.cuda.nvtx`` ranges and the StragglerDetector's GPU queries stay CUDA-only.

NPU support is UNTESTED ON HARDWARE (see `npu`).
"""

from __future__ import annotations

import torch

from mindspeed_models.adaptor import patching
from mindspeed_models.adaptor.patching import Patch, SeamDrift
from mindspeed_models.adaptor.seams import SEAMS, Seam, format_table, seams_for

__all__ = ["SEAMS", "Seam", "SeamDrift", "applied", "format_table", "grad_accum_fusion_available", "install", "installed"]

_TYPE_NAMES = ("FloatTensor", "HalfTensor", "BFloat16Tensor")
_state: dict = {"device": None, "patches": ()}


def _resolve_device(device) -> str:
    if device is None:
        from mindspeed_kernels.accelerator import device_type

        return device_type()
    if isinstance(device, torch.device):
        device = device.type
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "npu"):
        raise ValueError(f"install(device={device!r}): expected 'cpu', 'cuda', 'npu', a torch.device or None (auto)")
    return device.split(":")[0]


def installed() -> str | None:
    """The device megatron-core was adapted to in this process ("cpu", "cuda", "npu"), or None."""
    return _state["device"]


def applied() -> tuple[Patch, ...]:
    """The patches `install` applied in this process (one per row of `seams_for(installed())`)."""
    return _state["patches"]


def install(device=None) -> None:
    """Adapt megatron-core 0.16 to ``device``: "cpu", "cuda", "npu", a torch.device, or None for
    ``mindspeed_kernels.accelerator.device_type()``.

    Idempotent for the same device; a different device than the first call raises ValueError.
    "cuda" patches nothing. "npu" needs torch_npu. Raises `SeamDrift` (and undoes what it had
    patched) when megatron-core does not match the table.
    """
    kind = _resolve_device(device)
    if _state["device"] is not None:
        if _state["device"] != kind:
            raise ValueError(
                f"install(device={kind!r}): megatron-core is already adapted to {_state['device']!r} in this process; "
                "one device per process (start a new process for another device)"
            )
        return
    patches = _apply(kind, seams_for(kind)) if kind != "cuda" else ()
    _state.update(device=kind, patches=patches)


def grad_accum_fusion_available() -> bool:
    """Whether megatron's linears can take ``gradient_accumulation_fusion=True`` in this process:
    apex's ``fused_weight_gradient_mlp_cuda`` imported (CUDA), or the adaptor's stand-in was
    installed (cpu, npu). Call after :func:`install`."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def _device_parts(kind: str):
    if kind == "cpu":
        from mindspeed_models.adaptor import cpu

        return cpu.CpuCuda(), cpu.REPLACEMENTS, cpu.LOG_FILTERS, "torch."
    from mindspeed_models.adaptor import npu

    return npu.NpuCuda(npu.load_torch_npu()), npu.REPLACEMENTS, npu.LOG_FILTERS, "torch.npu."


def _apply(kind: str, rows: tuple[Seam, ...]) -> tuple[Patch, ...]:
    shim, replacements, log_filters, type_prefix = _device_parts(kind)
    namespace = patching.DeviceTorch(kind, shim)
    type_map = {f"torch.cuda.{name}": f"{type_prefix}{name}" for name in _TYPE_NAMES}
    done: list[Patch] = []
    try:
        for seam in rows:
            module = patching.import_seam_module(seam)
            if seam.kind == "torch":
                done.append(patching.patch_torch(seam, module, namespace))
            elif seam.kind == "device":
                done.append(patching.patch_code(seam, module, {"cuda": kind}, {}))
            elif seam.kind == "tensor_type":
                done.append(patching.patch_code(seam, module, type_map, {}))
            elif seam.kind == "method":
                done.append(patching.patch_code(seam, module, {}, {"cuda": kind}))
            elif seam.kind == "log":
                done.append(patching.patch_log_filter(seam, module, log_filters[seam.key]))
            else:
                done.append(patching.patch_attr(seam, module, replacements[seam.key]))
    except BaseException:
        for patch in reversed(done):
            patch.undo()
        raise
    return tuple(done)
