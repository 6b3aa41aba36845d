"""The CPU speed rows checked against megatron's own code and torch, in this process (megatron
imported, the adaptor installed, a one-rank parallel state): the one-rank vocab-parallel
cross-entropy and the foreach stand-ins for apex's multi-tensor kernels."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_models import adaptor, runtime
from mindspeed_models.adaptor import cpu


@pytest.fixture(scope="module")
def megatron():
    adaptor.install("cpu")
    runtime.ensure_parallel_state()
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.tensor_parallel.cross_entropy as cross_entropy
    import megatron.core.utils as utils

    return cross_entropy, clip_grads, utils


@pytest.fixture
def all_reduces(monkeypatch):
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return calls


def _logits_and_target(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, 11, generator=gen) * 4  # [S, B, V]
    return logits, torch.randint(0, 11, (5, 3), generator=gen)


def test_one_rank_cross_entropy_equals_torch_without_collectives(megatron, all_reduces):
    cross_entropy = megatron[0]
    assert cross_entropy._VocabParallelCrossEntropy.__wrapped__.__name__ == "_VocabParallelCrossEntropy"
    logits, target = _logits_and_target()
    ours = logits.clone().requires_grad_()
    loss = cross_entropy.vocab_parallel_cross_entropy(ours, target)
    weights = torch.rand(5, 3)
    (loss * weights).sum().backward()

    ref = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref.flatten(0, 1), target.flatten(), reduction="none").view(5, 3)
    (ref_loss * weights).sum().backward()
    assert all_reduces == []
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-7)


def _both(cross_entropy, logits, target, weights=None):
    """(loss, logits grad) of the one-rank row and of megatron's own function, each on its own copy."""
    out = []
    for function in (cross_entropy._VocabParallelCrossEntropy, cross_entropy._VocabParallelCrossEntropy.__wrapped__):
        x = logits.clone().requires_grad_()
        loss = function.apply(x, target, 0.0)
        (loss * (1.0 if weights is None else weights)).sum().backward()
        out.append((loss, x.grad))
    return out


def test_log_softmax_in_place_is_torchs_bitwise():
    # rows longer than a vector and more of them than one thread takes: the aliased out must not
    # overwrite an element before the kernel has read it
    logits = torch.randn(257, 1031, generator=torch.Generator().manual_seed(5)) * 4
    expected = torch.log_softmax(logits, dim=-1)
    out = cpu.log_softmax_(logits)
    assert out.data_ptr() == logits.data_ptr() and torch.equal(out, expected)


def test_one_rank_cross_entropy_equals_megatrons(megatron, all_reduces):
    logits, target = _logits_and_target(seed=1)
    (ours, ours_grad), (megatrons, megatrons_grad) = _both(megatron[0], logits, target, torch.rand(5, 3))
    assert len(all_reduces) == 3  # megatron's own only: max, target logit, sum of exp
    torch.testing.assert_close(ours, megatrons, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, megatrons_grad, rtol=1e-6, atol=1e-7)


def test_one_rank_cross_entropy_out_of_range_targets_are_megatrons(megatron, all_reduces):
    # megatron masks ids outside the rank's vocabulary: loss log-sum-exp(logits - max), no target gradient
    logits, target = _logits_and_target(seed=3)
    target[0, 1], target[4, 2] = 11, -1
    (ours, ours_grad), (megatrons, megatrons_grad) = _both(megatron[0], logits, target)
    shifted = logits - logits.amax(-1, keepdim=True)
    torch.testing.assert_close(ours[0, 1], torch.logsumexp(shifted[0, 1], -1))
    torch.testing.assert_close(ours, megatrons, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, megatrons_grad, rtol=1e-6, atol=1e-7)


def test_one_rank_cross_entropy_bf16_logits_stay_untouched(megatron, all_reduces):
    logits, target = _logits_and_target(seed=4)
    half = logits.bfloat16()
    kept = half.clone()
    loss = megatron[0].vocab_parallel_cross_entropy(half, target)
    ref = F.cross_entropy(half.float().flatten(0, 1), target.flatten(), reduction="none").view(5, 3)
    assert loss.dtype == torch.float32 and torch.equal(half, kept)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_label_smoothing_goes_to_megatrons_forward(megatron, all_reduces):
    cross_entropy = megatron[0]
    logits, target = _logits_and_target(seed=2)
    smoothed = cross_entropy.vocab_parallel_cross_entropy(logits.clone(), target, label_smoothing=0.1)
    assert len(all_reduces) == 3
    assert not torch.allclose(smoothed, cross_entropy.vocab_parallel_cross_entropy(logits.clone(), target))


def _grads(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in ((7, 3), (5,), (2, 4, 6), (1,))]


def test_foreach_l2norm_equals_megatrons_fallback_and_torch(megatron):
    _, clip_grads, utils = megatron
    assert clip_grads.l2_norm_impl is cpu.foreach_l2norm
    grads = _grads()
    flag = torch.zeros(1, dtype=torch.int)
    total, per_tensor = cpu.foreach_l2norm(2048, flag, [grads], False)
    megatrons, _ = utils.local_multi_tensor_l2_norm(2048, flag, [grads], False)
    assert per_tensor is None and total.shape == (1,) and total.dtype == torch.float32
    assert torch.equal(total, megatrons)
    torch.testing.assert_close(total[0], torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    _, norms = cpu.foreach_l2norm(2048, flag, [grads], True)
    assert torch.equal(norms, torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert torch.equal(cpu.foreach_l2norm(2048, flag, [[]], False)[0], torch.zeros(1))


def test_foreach_scale_equals_megatrons_fallback(megatron):
    _, clip_grads, utils = megatron
    assert clip_grads.multi_tensor_scale_impl is cpu.foreach_scale
    flag = torch.zeros(1, dtype=torch.int)
    ours, megatrons = _grads(1), _grads(1)
    cpu.foreach_scale(2048, flag, [ours, ours], 0.37)  # in place, as clip_grad_by_total_norm_fp32 calls it
    utils.local_multi_tensor_scale(2048, flag, [megatrons, megatrons], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(ours, megatrons, strict=True))

    src = _grads(2)
    for scale in (1.0, 2.5):  # into other tensors, with a dtype change (main -> model params)
        dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        ref = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
        cpu.foreach_scale(2048, flag, [src, dst], scale)
        utils.local_multi_tensor_scale(2048, flag, [src, ref], scale)
        assert all(torch.equal(a, b) for a, b in zip(dst, ref, strict=True))


def test_fallback_rows_keep_an_installed_kernel_and_detect_drift(megatron):
    utils = megatron[2]
    factory = cpu.REPLACEMENTS[("optimizer.clip_grads", "l2_norm_impl")]
    assert factory(utils.local_multi_tensor_l2_norm) is cpu.foreach_l2norm

    def apex_kernel(*args):  # stands in for amp_C.multi_tensor_l2norm
        return args

    assert factory(apex_kernel) is apex_kernel
    with pytest.raises(cpu.SeamDrift, match="seams.py"):
        factory(cpu.MISSING)
    with pytest.raises(cpu.SeamDrift, match="seams.py"):
        cpu.REPLACEMENTS[("tensor_parallel.cross_entropy", "_VocabParallelCrossEntropy")](cpu.MISSING)
