"""THE table of megatron-core 0.16 call sites the adaptor adapts, as data.

One `Seam` per patched object. `install` applies exactly these rows (nothing else) and the tests
check that what is patched in a process is what this table lists. Line numbers are
megatron-core 0.16.1's and are documentation only; the patch itself finds its target by name
and fails loudly (`SeamDrift`) when a target or a constant it rewrites is gone.

Kinds (how a row is applied; see `mindspeed_models.adaptor.patching`):

- ``torch``: the module's global name ``torch`` is rebound to a thin namespace that is real
  ``torch`` except for ``.cuda``, which is the device's shim (`cpu.CpuCuda`, `npu.NpuCuda`).
  ``calls`` lists the ``torch.cuda`` attributes that module uses and the shim implements; any
  other ``torch.cuda`` attribute passes through to the real one (and fails where CUDA is absent,
  as it would without the adaptor).
- ``device``: in one function, the string constant ``"cuda"`` (``device="cuda"`` literals, which no
  ``torch.cuda`` shim can reach) is rewritten to ``"cpu"`` / ``"npu"`` in its code object.
- ``tensor_type``: in one function, the ``tensor.type()`` strings ``'torch.cuda.FloatTensor'``,
  ``'torch.cuda.HalfTensor'``, ``'torch.cuda.BFloat16Tensor'`` become the device's spelling
  (``'torch.FloatTensor'`` on CPU, ``'torch.npu.FloatTensor'`` on NPU).
- ``method``: in one function, the method name ``.cuda()`` becomes ``.cpu()`` / ``.npu()``.
- ``attr``: an attribute (module function, class attribute) is replaced by the object the device
  module's ``REPLACEMENTS`` table holds under the row's key.
- ``log``: a filter is added to the module's logger (its ``filters`` list is replaced by a copy
  with the filter appended) to drop a warning that is expected on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("torch", "device", "tensor_type", "method", "attr", "log")
DEVICES = ("cpu", "npu")  # "cuda" is megatron-core's own device: nothing to adapt.

# The torch.cuda attributes the shims implement (each device module must provide all of them).
SHIM_CALLS = (
    "current_device", "synchronize", "Stream", "Event", "stream", "current_stream", "default_stream",
    "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "random", "default_generators",
    "empty_cache",
)  # fmt: skip


@dataclass(frozen=True)
class Seam:
    """One adapted object: ``megatron.core.<module>`` attribute/function ``target``.

    ``calls``: for ``torch`` rows, the ``torch.cuda`` attributes used there; otherwise the call
    sites in words. ``lines``: megatron-core 0.16.1 line numbers (documentation). ``cpu`` /
    ``npu``: what the seam becomes on each device. ``why``: what breaks without it.
    ``devices``: where the row applies.
    """

    module: str
    target: str
    kind: str
    calls: tuple[str, ...]
    lines: tuple[int, ...]
    cpu: str
    npu: str
    why: str
    devices: tuple[str, ...] = DEVICES

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.target)

    @property
    def full_module(self) -> str:
        return f"megatron.core.{self.module}"


_SHIM_CPU = "CPU shim: current_device() -> torch.device('cpu'); streams/events/synchronize no-ops; RNG on CPU generator"
_SHIM_NPU = "torch.npu (current_device() -> torch.device('npu', index))"
_DEV_CPU, _DEV_NPU = "device literal 'cuda' -> 'cpu'", "device literal 'cuda' -> 'npu'"
_TYPE_CPU, _TYPE_NPU = "'torch.cuda.XTensor' -> 'torch.XTensor'", "'torch.cuda.XTensor' -> 'torch.npu.XTensor'"


def _torch(module: str, calls: tuple[str, ...], lines: tuple[int, ...], why: str) -> Seam:
    return Seam(module, "torch", "torch", calls, lines, _SHIM_CPU, _SHIM_NPU, why)


def _device(module: str, target: str, lines: tuple[int, ...], why: str) -> Seam:
    return Seam(module, target, "device", ("device='cuda'",), lines, _DEV_CPU, _DEV_NPU, why)


def _type(module: str, target: str, lines: tuple[int, ...]) -> Seam:
    why = "fp32/fp16/bf16 params are classified by tensor.type(); any other device's spelling is rejected"
    return Seam(module, target, "tensor_type", ("tensor.type() ==",), lines, _TYPE_CPU, _TYPE_NPU, why)


SEAMS: tuple[Seam, ...] = (
    # --- module-global torch.cuda calls -------------------------------------------------------
    _torch("tensor_parallel.mappings", ("current_device",), (91, 141, 148, 181, 442),
           "TP/SP gather and reduce-scatter output buffers are allocated on torch.cuda.current_device()"),
    _torch("tensor_parallel.layers", ("current_device",), (261, 552, 597, 607, 873, 899, 1197, 1218),
           "parameter allocation (use_cpu_initialization=False) and the SP all-gather buffer"),
    _torch("tensor_parallel.random", ("current_device", "get_rng_state", "set_rng_state", "manual_seed",
                                      "random", "default_generators"), (55, 64, 66, 102, 103, 235, 237, 238, 422),
           "CudaRNGStatesTracker and model_parallel_cuda_manual_seed keep the per-TP-rank streams in the CUDA generator"),
    _torch("utils", ("current_device", "Event", "synchronize"), (631, 1475, 1520, 1521, 1596),
           "GlobalMemoryBuffer (SP all-gather scratch) allocates on the current device; StragglerDetector events"),
    _torch("transformer.moe.router", ("current_device",), (90, 92, 169, 178, 192, 198),
           "the router moves its CPU-initialised weights to torch.cuda.current_device() on first use"),
    _torch("transformer.multi_token_prediction", ("current_device",), (337,), "MTP buffers on the current device"),
    _torch("transformer.transformer_layer", ("current_device",), (936, 1147), "static-input masks on the current device"),
    _torch("models.common.embeddings.rotary_pos_embedding", ("current_device",), (78, 162, 297),
           "inv_freq is built or moved onto the current device"),
    _torch("models.common.embeddings.yarn_rotary_pos_embedding", ("current_device",), (76, 122, 126),
           "YaRN inv_freq and mscale tables on the current device"),
    _torch("pipeline_parallel.p2p_communication", ("current_device", "synchronize"), (190, 198, 242, 313, 321, 398),
           "PP receive buffers on the current device; torch.cuda.synchronize() after batched p2p"),
    _torch("distributed.param_and_grad_buffer", ("current_device", "stream", "default_stream"), (417, 422, 529, 800, 806),
           "DDP param/grad buffers on the current device; communication streams"),
    _torch("distributed.distributed_data_parallel", ("current_device", "Stream", "synchronize", "empty_cache"),
           (230, 588, 594, 611), "communication stream for partial DistOpt; buffer offload synchronisation"),
    _torch("optimizer.optimizer", ("current_device", "empty_cache"), (362, 1141), "loss-scale tensor and state offload"),
    _torch("optimizer.distrib_optimizer", ("current_device",), (791, 1077), "state (re)loading buffers on the current device"),
    _torch("optimizer.grad_scaler", ("current_device",), (140,), "a loaded fp16 loss scale moves to the current device"),
    _torch("transformer.moe.token_dispatcher", ("Stream", "stream", "current_stream"), (445, 871, 873, 874),
           "the alltoall dispatcher creates a side stream for its device-to-host copies in __init__"),
    _torch("dist_checkpointing.strategies.state_dict_saver", ("current_device",), (252,),
           "the save-finalize failure flag is all-reduced from the current device"),
    _torch("dist_checkpointing.strategies.filesystem_async", ("synchronize",), (230,),
           "torch.cuda.synchronize() after staging tensors to host for a save"),
    # --- device='cuda' literals -------------------------------------------------------------------
    _device("transformer.utils", "get_default_causal_mask", (35,), "the causal mask of the local (non-TE) attention"),
    _device("transformer.utils", "get_sliding_window_causal_mask", (40,), "sliding-window attention mask"),
    _device("pipeline_parallel.schedules", "forward_backward_no_pipelining", (596,), "token counter of PP=1"),
    _device("transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__", (404,),
            "with moe_permute_fusion the alltoall dispatcher keeps its chunk-sort indices on torch.device('cuda')"),
    _device("pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving", (983,), "token counter of VPP"),
    _device("pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving", (2138,),
            "token counter of 1F1B"),
    _device("optimizer.optimizer", "MixedPrecisionOptimizer.__init__", (473, 481, 485), "found_inf / overflow buffers"),
    _device("optimizer.optimizer", "FP32Optimizer.__init__", (907,), "the constant loss scale"),
    _device("optimizer.grad_scaler", "MegatronGradScaler.__init__", (15,), "the fp16 loss scale"),
    _device("optimizer.grad_scaler", "DynamicGradScaler.__init__", (88, 91, 94),
            "the dynamic fp16 loss scaler's min scale, growth and backoff factors"),
    _device("optimizer.clip_grads", "get_grad_norm_fp32", (90, 103, 115), "grad-norm buffers (clip_grad > 0)"),
    _device("optimizer.clip_grads", "clip_grad_by_total_norm_fp32", (174,), "overflow buffer of the clip"),
    _device("optimizer.clip_grads", "count_zeros_fp32", (207,), "zero-count buffer (log_num_zeros_in_grad)"),
    _device("utils", "local_multi_tensor_l2_norm", (1207,), "the no-apex grad-norm fallback returns a device tensor"),
    _device("dist_checkpointing.strategies.state_dict_saver", "verify_global_md_reuse", (204,),
            "the cached-metadata agreement flag of a save"),
    # --- tensor.type() checks -------------------------------------------------------------------------
    _type("optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__", (671, 690)),
    _type("optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups", (361, 420)),
    _type("optimizer.distrib_optimizer", "DistributedOptimizer.__init__", (582,)),
    _type("optimizer.clip_grads", "clip_grad_by_total_norm_fp32", (167,)),
    # --- .cuda() ---------------------------------------------------------------------------------------
    Seam("models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer",
         "method", ("weight.data.cuda()",), (244,), ".cuda() -> .cpu()", ".cuda() -> .npu()",
         "tied embeddings under PP move the shared weight with .cuda() before all-reducing it"),
    Seam("optimizer.grad_scaler", "DynamicGradScaler.load_state_dict", "method", ("state_dict['scale'].cuda(...)",),
         (140,), ".cuda() -> .cpu()", ".cuda() -> .npu()", "a resumed fp16 run's loss scale is moved with .cuda()"),
    # --- replaced attributes -------------------------------------------------------------------------------
    Seam("tensor_parallel.random", "_lazy_call", "attr", ("_set_cuda_rng_state",), (12, 110),
         "call immediately", "torch.npu._lazy_call",
         "torch.cuda._lazy_call defers the RNG-state restore until CUDA initialises, i.e. forever off CUDA"),
    Seam("transformer.torch_norm", "WrappedTorchNorm.__new__", "attr", ("WrappedTorchNorm(config, ...)",), (32,),
         "allow sequence_parallel; tag norm params .sequence_parallel", "same as cpu",
         "without apex/TE the local spec's norm asserts on sequence_parallel; the tag makes "
         "finalize_model_grads all-reduce the norm grads over TP"),
    Seam("transformer.moe.moe_utils", "te_general_gemm", "attr", ("RouterGatingLinearFunction.forward",), (1192,),
         "None when transformer_engine is absent", "same as cpu",
         "the name is bound only when TE imports, so every router gating GEMM (any dtype but fp64) raises NameError without TE"),
    Seam("tensor_parallel.random", "CheckpointWithoutOutput.__init__", "attr",
         ("CheckpointWithoutOutputFunction.forward", "CheckpointWithoutOutput._recompute"), (589, 592, 683),
         "fp8 only when fp8 is truthy (and TE imports)", "same as cpu",
         "CheckpointWithoutOutput(fp8=False) sets fp8 = (False is not None) = True, so output-discarding recompute "
         "(layernorm, moe_act, mla_up_proj) calls TE's FP8GlobalStateManager / activation_recompute_forward, "
         "names bound only when transformer_engine imports"),
    Seam("transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", "attr", ("_maybe_dtoh_and_synchronize",),
         (878, 881, 884, 887),
         "split sizes -> numpy (they are already on the host)", "copy to host for any non-CPU tensor",
         "megatron only moves CUDA tensors, so off CUDA the alltoall split sizes stay tensors and "
         "all_to_all_single rejects them"),
    Seam("tensor_parallel.layers", "fused_weight_gradient_mlp_cuda", "attr",
         ("LinearWithGradAccumulationAndAsyncCommunication.backward",), (46, 569, 573),
         "cpu.wgrad_gemm_accum (main_grad.addmm_) unless apex is installed", "same as cpu",
         "gradient_accumulation_fusion (megatron's default) needs apex's extension, bound only when it imports"),
    Seam("tensor_parallel.layers", "_grad_accum_fusion_available", "attr",
         ("ColumnParallelLinear.__init__", "RowParallelLinear.__init__"), (44, 924),
         "True (the stand-in above)", "same as cpu",
         "the linears refuse gradient_accumulation_fusion=True when apex's extension did not import"),
    Seam("optimizer.clip_grads", "l2_norm_impl", "attr", ("get_grad_norm_fp32",), (42, 109),
         "cpu.foreach_l2norm (torch._foreach_norm) in place of megatron's no-apex fallback", "same as cpu",
         "without apex/TE megatron's fallback takes each gradient's norm in a Python loop and copies the norms "
         "through host floats, every step"),
    Seam("optimizer.clip_grads", "multi_tensor_scale_impl", "attr", ("clip_grad_by_total_norm_fp32",), (43, 176),
         "cpu.foreach_scale (torch._foreach_mul_) in place of megatron's no-apex fallback", "same as cpu",
         "without apex/TE megatron's fallback clips gradient by gradient in Python (a product and a copy each)"),
    Seam("optimizer.optimizer", "multi_tensor_scale_impl", "attr", ("_multi_tensor_copy_this_to_that",), (37, 90),
         "cpu.foreach_scale (torch._foreach_copy_) in place of megatron's no-apex fallback", "same as cpu",
         "the same Python loop for the main-to-model parameter copies of half-precision training"),
    Seam("tensor_parallel.layers", "copy_to_tensor_model_parallel_region", "attr", ("ColumnParallelLinear.forward",),
         (1001,), "the input itself when the TP group has one rank, else megatron's", "unchanged",
         "at TP=1 the region is an identity autograd function in both directions; on CPU, where ops run as they are "
         "issued, its Python cost (a node per column-parallel linear, forward and backward) is on the critical path",
         devices=("cpu",)),
    Seam("tensor_parallel.layers", "reduce_from_tensor_model_parallel_region", "attr",
         ("VocabParallelEmbedding.forward", "RowParallelLinear.forward"), (300, 1294),
         "the input itself when the TP group has one rank, else megatron's", "unchanged",
         "the same identity at TP=1 after every row-parallel linear and the embedding", devices=("cpu",)),
    Seam("tensor_parallel.cross_entropy", "_VocabParallelCrossEntropy", "attr", ("vocab_parallel_cross_entropy",),
         (122, 232), "for a one-rank TP group without label smoothing, megatron's steps without the all-reduces; "
         "else megatron's", "unchanged",
         "at TP=1 the loss's three all-reduces (max, target logit, sum of exp) are identities; on gloo each is a "
         "round trip through the communication thread on the critical path of every microbatch",
         devices=("cpu",)),
    Seam("tensor_parallel.layers", "linear_with_grad_accumulation_and_async_allreduce", "attr",
         ("ColumnParallelLinear._forward_impl", "RowParallelLinear._forward_impl"), (629, 745, 948, 1239),
         "float32 calls without sequence parallelism or deferred weight gradients: the same linear with its forward "
         "and input-gradient GEMMs through mindspeed_kernels.ops.linear (oneDNN); else megatron's", "unchanged",
         "torch.matmul runs CPU float32 GEMMs through MKL's sgemm, 10-20% slower than oneDNN's on the CPUs measured; "
         "the linears' GEMMs are most of a CPU training step", devices=("cpu",)),
    Seam("pipeline_parallel.p2p_communication", "_batched_p2p_ops", "attr", ("P2PCommunicator._communicate",), (16, 355),
         "megatron's _p2p_ops (even/odd ordering, two communicators for a 2-rank PP group), as a list", "unchanged",
         "gloo runs batch_isend_irecv op by op and matches messages from one peer in order; with PP=2 both directions "
         "go to the same peer and the batched order swaps activations and gradients (interleaved schedule)",
         devices=("cpu",)),
    Seam("tensor_parallel.random", "logger", "log", ("CudaRNGStatesTracker.fork",), (265,),
         "drop the warning 'CPU RNG state changed within GPU RNG context'", "unchanged",
         "on CPU the 'CUDA' generator is the CPU one, so every random op inside fork() (dropout) would log it",
         devices=("cpu",)),
    Seam("dist_checkpointing.strategies.filesystem_async", "_process_memory", "attr",
         ("FileSystemWriterAsync.write_preloaded_data",), (366, 414, 642),
         "process RSS without psutil (mindspeed_kernels.accelerator.memory_stats('cpu'))", "same as cpu",
         "every torch_dist save, synchronous too, forks writers that log their RSS through psutil; without "
         "psutil they die and the parent waits forever in count_queue.join()"),
)  # fmt: skip


def seams_for(device: str) -> tuple[Seam, ...]:
    """The rows `install(device)` applies: all of them on cpu/npu, none on cuda."""
    if device == "cuda":
        return ()
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of 'cpu', 'cuda', 'npu'")
    return tuple(seam for seam in SEAMS if device in seam.devices)


def format_table(device: str = "cpu") -> str:
    """The table as GitHub markdown (module, target, kind, lines, what it becomes on ``device``, why)."""
    rows = ["| module (megatron.core.) | target | kind | lines | becomes | why |", "|---|---|---|---|---|---|"]
    for s in seams_for(device):
        becomes = s.cpu if device == "cpu" else s.npu
        lines = ",".join(map(str, s.lines))
        rows.append(f"| {s.module} | {s.target} | {s.kind} | {lines} | {becomes} | {s.why} |")
    return "\n".join(rows)
