"""CPU: ``torch.cuda`` as the adapted megatron-core modules see it, and the CPU replacements.

`CpuCuda` implements the ``torch.cuda`` calls listed in `seams.SHIM_CALLS`:

- ``current_device()`` is ``torch.device("cpu")`` (not an int: megatron passes it to ``device=``,
  ``.to()`` and ``with torch.device(...)``, and an int means an accelerator index);
- streams, events, ``synchronize`` and ``empty_cache`` are no-ops (CPU work is synchronous);
- the "CUDA" generator is torch's CPU default generator, the one CPU ops (dropout, init) draw
  from, so ``CudaRNGStatesTracker.fork()`` switches the stream CPU ops use and per-TP-rank
  streams still differ. Seeding goes through ``torch.default_generator.manual_seed``, not
  ``torch.manual_seed``: that one also calls ``torch.cuda.manual_seed_all``, which would recurse
  into this shim if torch.cuda were ever patched globally.

Any other attribute is the real ``torch.cuda``'s (e.g. ``is_available()`` stays False).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types

import torch

from mindspeed_models.adaptor.patching import MISSING, SeamDrift


class NullEvent:
    """An event on a synchronous device: always complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        del enable_timing, blocking, interprocess

    def record(self, stream=None) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: NullEvent) -> float:
        return 0.0


class NullStream:
    """A stream on a synchronous device: work is done when it is issued."""

    def __init__(self, device=None, priority: int = 0, **_kwargs) -> None:
        del device, priority

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event: NullEvent | None = None) -> NullEvent:
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _DefaultGenerators:
    """``torch.cuda.default_generators[i]`` for any index (an int or a device): the CPU generator."""

    def __getitem__(self, index) -> torch.Generator:
        return torch.default_generator

    def __len__(self) -> int:
        return 1


_DEFAULT_STREAM = NullStream()


def _get_rng_state(device=None) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device=None) -> None:
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class CpuCuda:
    """``torch.cuda`` for megatron-core modules running on CPU (see the module docstring)."""

    Stream = NullStream
    Event = NullEvent
    default_generators = _DefaultGenerators()
    random = types.SimpleNamespace(get_rng_state=_get_rng_state, set_rng_state=_set_rng_state, manual_seed=_manual_seed)
    get_rng_state = staticmethod(_get_rng_state)
    set_rng_state = staticmethod(_set_rng_state)
    manual_seed = staticmethod(_manual_seed)
    manual_seed_all = staticmethod(_manual_seed)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def stream(stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(device=None) -> NullStream:
        return _DEFAULT_STREAM

    @staticmethod
    def default_stream(device=None) -> NullStream:
        return _DEFAULT_STREAM

    def __getattr__(self, name: str):
        # Only reached for attributes not defined above: the real torch.cuda's.
        return getattr(torch.cuda, name)

    def __repr__(self) -> str:
        return "<torch.cuda adapted to cpu by mindspeed_models.adaptor>"


def lazy_call(callback, **_kwargs) -> None:
    """``torch.cuda._lazy_call`` on CPU: there is no lazy CUDA initialisation to wait for."""
    callback()


def host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for any device: tensors not on the host are copied there
    (megatron copies only CUDA tensors), and ``as_numpy`` applies to host tensors too, so the
    alltoall split sizes reach ``all_to_all_single`` as numpy arrays as they do on CUDA."""
    if not torch.is_tensor(tensor):
        return tensor
    if tensor.device.type != "cpu":
        if record_stream:  # the copy runs on the dispatcher's side stream: keep the source alive
            tensor.record_stream(getattr(torch, tensor.device.type).current_stream())
        tensor = tensor.to("cpu", non_blocking=True)
    return tensor.numpy() if as_numpy else tensor


def process_rss() -> int:
    """Resident set size of this process in bytes (what megatron's checkpoint writers log),
    without psutil."""
    from mindspeed_kernels.accelerator import memory_stats

    return memory_stats("cpu").current_bytes


def _ordered_p2p_factory(original):
    """``_batched_p2p_ops`` for gloo: megatron's ``_p2p_ops`` of the same module (ordered sends and
    receives), returning the list of requests the batched caller expects."""
    p2p_ops = sys.modules[original.__module__]._p2p_ops

    def batched_p2p_ops(**kwargs) -> list:
        return list(p2p_ops(**kwargs).values())

    return batched_p2p_ops


def _norm_new_factory(original):
    """``WrappedTorchNorm.__new__`` that builds the torch norm under sequence parallelism too."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original(cls, config, hidden_size, eps, *args, **kwargs)
        # The norm itself is per token, so SP only needs its params' grads summed over TP, which
        # finalize_model_grads does for params tagged .sequence_parallel (as apex/TE norms are).
        # A shallow copy does not re-run TransformerConfig.__post_init__.
        relaxed = copy_config(config, sequence_parallel=False)
        norm = original(cls, relaxed, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


def _checkpoint_init_factory(original):
    """``CheckpointWithoutOutput.__init__`` that takes the TE FP8 path only for a truthy ``fp8``
    when transformer_engine is importable (megatron tests ``fp8 is not None``, so False counts)."""
    import megatron.core.tensor_parallel.random as random_module

    def __init__(self, fp8=False):
        original(self, fp8=fp8)
        self.fp8 = bool(fp8) and bool(getattr(random_module, "HAVE_TE", False))

    return __init__


def wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` over the flattened leading dims: the contract of
    apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32/fp16`` (MindSpeed's
    ``npu_matmul_add_fp32``), which megatron's linear backward calls under
    ``gradient_accumulation_fusion``: the weight gradient lands in the DDP buffer in one GEMM,
    without a separate ``param.grad`` and the hook's ``main_grad.add_``."""
    x = total_input.reshape(-1, total_input.shape[-1])
    g = grad_output.reshape(-1, grad_output.shape[-1])
    if x.dtype == g.dtype == main_grad.dtype:
        main_grad.addmm_(g.t(), x)
    else:  # half activations into an fp32 buffer: the product in their dtype, as megatron's unfused path
        main_grad.add_(g.t().matmul(x))


# stands in for apex's extension module where it is not installed
WGRAD_ACCUMULATION = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum, wgrad_gemm_accum_fp16=wgrad_gemm_accum)


def _require_bound(original, what: str) -> None:
    """SeamDrift when megatron no longer binds ``what`` (the row's original is MISSING)."""
    if original is MISSING:
        raise SeamDrift(f"megatron-core no longer binds {what}; update mindspeed_models/adaptor/seams.py")


def foreach_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor=False, *args):
    """apex's ``amp_C.multi_tensor_l2norm`` contract as megatron calls it: ``(total, per_tensor_norms)``,
    ``total`` the L2 norm over all tensors of ``tensor_lists[0]`` as a float32 [1] tensor. torch's
    ``_foreach_norm`` computes each tensor's norm as ``torch.norm`` does (megatron's fallback loops
    over them in Python and round-trips the norms through host floats)."""
    del chunk_size, noop_flag, args
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch.stack([norm.float() for norm in torch._foreach_norm(tensors)])
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale, *args):
    """apex's ``amp_C.multi_tensor_scale`` contract: ``dst = src * scale`` over ``tensor_lists = [src, dst]``
    (a copy with dtype conversion when ``scale`` is 1), in torch's ``_foreach`` ops."""
    del chunk_size, noop_flag, args
    src, dst = tensor_lists[0], tensor_lists[1]
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(a is b for a, b in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _local_fallback_factory(replacement, local_name: str):
    """Replace megatron's no-apex stand-in ``megatron.core.utils.<local_name>`` with ``replacement``;
    keep apex's / TE's kernel where one was bound instead."""

    def factory(original):
        import megatron.core.utils as mcore_utils

        _require_bound(original, f"the multi-tensor kernel that falls back to {local_name}")
        return replacement if original is getattr(mcore_utils, local_name, None) else original

    return factory


def _one_rank_region_factory(original):
    """megatron's ``copy_to_`` / ``reduce_from_tensor_model_parallel_region`` that return the input
    itself for a one-rank TP group, where megatron's autograd function is an identity both ways
    (its forward returns the input, its backward all-reduce is skipped for one rank); any other
    group (or ``group=None``, megatron's default group) goes to megatron's function."""
    _require_bound(original, "tensor_parallel.layers' TP region functions")

    def region(input_, group=None):
        if group is not None and group.size() == 1:
            return input_
        return original(input_, group)

    region.__wrapped__ = original
    return region


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (contiguous, floating) overwritten with their log-softmax over the last dim, returned.

    torch's fused kernel, one read of each row in cache, where megatron's steps (max, subtract, exp,
    sum, divide) make five passes over the whole [S, B, V] tensor; written into the logits themselves,
    as megatron's steps are, so no second logits-sized tensor is alive. The kernel reads each element
    of a row before it writes that element (max, sum of exp, then out = x - max - log sum), so the
    aliased ``out`` is exact (tests compare it with torch's out-of-place result bitwise)."""
    rows = logits.view(-1, logits.size(-1))
    torch.log_softmax(rows, dim=-1, out=rows)
    return logits


def _kernel_linear_factory(original):
    """megatron's linear function with the kernels' GEMM for CPU float32 calls (``cpu_linear``)."""
    _require_bound(original, "tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce")
    from mindspeed_models.adaptor.cpu_linear import kernel_linear_factory

    return kernel_linear_factory(original)


def _one_rank_cross_entropy_factory(original):
    """megatron's ``_VocabParallelCrossEntropy`` whose forward, for a one-rank TP group without
    label smoothing, computes the same loss and softmax without the three all-reduces (identities on
    one rank) and with torch's fused log-softmax (`log_softmax_`) in place of megatron's five passes;
    any other case is megatron's forward. The backward is megatron's (it never communicates): it gets
    the same saved tensors (softmax, out-of-range target mask, masked target)."""
    _require_bound(original, "tensor_parallel.cross_entropy._VocabParallelCrossEntropy")
    from megatron.core import parallel_state

    class OneRankVocabParallelCrossEntropy(original):
        @staticmethod
        def forward(ctx, vocab_parallel_logits, target, label_smoothing=0.0):
            if label_smoothing > 0 or parallel_state.get_tensor_model_parallel_world_size() != 1:
                return original.forward(ctx, vocab_parallel_logits, target, label_smoothing)
            vocab = vocab_parallel_logits.size(-1)
            # .float() is the input itself for float32 logits, which megatron's steps overwrite too
            log_probs = log_softmax_(vocab_parallel_logits.float().contiguous())
            # megatron's target mask: ids outside this rank's vocabulary predict nothing (loss = log sum exp)
            mask = (target < 0) | (target >= vocab)
            masked_target = target.masked_fill(mask, 0)
            loss = -log_probs.gather(-1, masked_target.unsqueeze(-1)).squeeze(-1)
            if mask.any():  # log sum exp(logits - max) = -max(log_probs)
                loss = torch.where(mask, -log_probs.amax(dim=-1), loss)
            ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab
            ctx.save_for_backward(log_probs.exp_(), mask, masked_target.view(-1))
            return loss

    OneRankVocabParallelCrossEntropy.__wrapped__ = original
    return OneRankVocabParallelCrossEntropy


def copy_config(config, **changes):
    """A shallow copy of a (dataclass) config with ``changes``, without re-running validation."""
    out = copy.copy(config)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


# attr-seam key -> factory(original) -> replacement. SHARED: fixes for what is missing off CUDA
# (apex/TE norms, TE's GEMM, psutil, CUDA-only host copies), the same on cpu and npu.
SHARED_REPLACEMENTS = {
    ("transformer.torch_norm", "WrappedTorchNorm.__new__"): _norm_new_factory,
    ("transformer.moe.moe_utils", "te_general_gemm"): lambda original: None if original is MISSING else original,
    ("tensor_parallel.random", "CheckpointWithoutOutput.__init__"): _checkpoint_init_factory,
    ("transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu"): lambda original: host_copy,
    ("dist_checkpointing.strategies.filesystem_async", "_process_memory"): lambda original: process_rss,
    ("tensor_parallel.layers", "fused_weight_gradient_mlp_cuda"):
        lambda original: WGRAD_ACCUMULATION if original is MISSING else original,
    ("tensor_parallel.layers", "_grad_accum_fusion_available"): lambda original: True,
    ("optimizer.clip_grads", "l2_norm_impl"): _local_fallback_factory(foreach_l2norm, "local_multi_tensor_l2_norm"),
    ("optimizer.clip_grads", "multi_tensor_scale_impl"): _local_fallback_factory(foreach_scale, "local_multi_tensor_scale"),
    ("optimizer.optimizer", "multi_tensor_scale_impl"): _local_fallback_factory(foreach_scale, "local_multi_tensor_scale"),
}
REPLACEMENTS = {
    **SHARED_REPLACEMENTS,
    ("tensor_parallel.random", "_lazy_call"): lambda original: lazy_call,
    ("pipeline_parallel.p2p_communication", "_batched_p2p_ops"): _ordered_p2p_factory,
    ("tensor_parallel.layers", "copy_to_tensor_model_parallel_region"): _one_rank_region_factory,
    ("tensor_parallel.layers", "reduce_from_tensor_model_parallel_region"): _one_rank_region_factory,
    ("tensor_parallel.cross_entropy", "_VocabParallelCrossEntropy"): _one_rank_cross_entropy_factory,
    ("tensor_parallel.layers", "linear_with_grad_accumulation_and_async_allreduce"): _kernel_linear_factory,
}
# log-seam key -> message to drop: on CPU the "CUDA" generator is the CPU one, so the check in
# CudaRNGStatesTracker.fork() that the CPU state did not move fires on every forked draw.
LOG_FILTERS = {("tensor_parallel.random", "logger"): "CPU RNG state changed within GPU RNG context"}
