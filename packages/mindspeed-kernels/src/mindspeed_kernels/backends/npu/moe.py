"""moe_token_permute -> ``torch_npu.npu_moe_token_permute(tokens, indices, num_out_tokens=None,
padded_mode=False) -> (permuted_tokens, sorted_indices)``; moe_token_unpermute ->
``torch_npu.npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False,
restore_shape=None)``.

Index convention: the kernel's ``sorted_indices`` is ``argsort(argsort(flat indices))``, the
output row of each flat slot ``t * K + k``; ours (Megatron's) is the inverse, the slot of each
output row. The backend converts with one int32 scatter in each direction (O(T*K), no sync).
The kernel's sort is assumed stable (ties keep slot order, as the contract requires).

``num_out_tokens``: the kernel reads 0 as "keep all"; a request for 0 rows is served by keeping
all and slicing. Dropped slots (kernel rows >= R) are assumed to contribute nothing in
unpermute, as the contract requires.

Documented dtypes: tokens bfloat16 only, indices int64 [T, K] (a [T] input is viewed as
[T, 1]), sorted_indices int32, probs bfloat16. Other token dtypes, and an unpermute of zero
rows (everything dropped), run the reference implementation; float32 probs are rounded to
bfloat16 for the kernel (an error below the bfloat16 output's resolution). The kernel's
accumulation precision for the K products is not documented and is assumed to be float32.
Gradients come from torch_npu's autograd formulas.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends.npu._common import reference_op


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (int32): converts between the two index conventions."""
    ramp = torch.arange(perm.numel(), dtype=torch.int32, device=perm.device)
    return torch.empty_like(ramp).scatter_(0, perm.long(), ramp)


def moe_token_permute(tokens, indices, num_out_tokens=None):
    """See :func:`mindspeed_kernels.ops.moe_token_permute` and this module's docstring."""
    if tokens.dtype != torch.bfloat16:
        return reference_op("moe_token_permute")(tokens, indices, num_out_tokens)
    import torch_npu

    slots = indices.reshape(tokens.shape[0], -1).long()
    keep = None if num_out_tokens in (None, 0) else num_out_tokens
    permuted, rows = torch_npu.npu_moe_token_permute(tokens, slots, num_out_tokens=keep)
    if num_out_tokens == 0:
        permuted = permuted[:0]
    return permuted, invert_permutation(rows)


def moe_token_unpermute(permuted_tokens, sorted_indices, probs=None):
    """See :func:`mindspeed_kernels.ops.moe_token_unpermute` and this module's docstring."""
    if permuted_tokens.dtype != torch.bfloat16 or permuted_tokens.shape[0] == 0:
        return reference_op("moe_token_unpermute")(permuted_tokens, sorted_indices, probs)
    import torch_npu

    rows = invert_permutation(sorted_indices)
    weights = None if probs is None else probs.to(torch.bfloat16)
    return torch_npu.npu_moe_token_unpermute(permuted_tokens, rows, probs=weights)
