"""fused_linear_cross_entropy (single process) against ``F.cross_entropy(hidden @ weight.T)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mindspeed_kernels.ops import fused_linear_cross_entropy
from mindspeed_kernels.testing import assert_close

IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")


def naive(hidden, weight, labels, ignore_index=IGNORE, reduction="mean"):
    """The unfused formula in float32 (float64 stays float64): full logits, then F.cross_entropy."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    flat_logits, flat_labels = logits.reshape(-1, weight.shape[0]), labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def make(shape=(2, 5), hidden_size=8, vocab=13, dtype=torch.float32, n_ignored=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[torch.randperm(labels.numel(), generator=gen)[:n_ignored]] = IGNORE
    return hidden, weight, labels


def upstream(loss, seed=1):
    """A non-trivial upstream gradient: 3.7 for a scalar, random per-token weights for "none"."""
    if loss.dim() == 0:
        return torch.tensor(3.7)
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) * 2


def grads(fn, hidden, weight, labels, **kwargs):
    """(loss, d_hidden, d_weight) of ``sum(fn(...) * upstream)`` on fresh leaves."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs)
    (loss * upstream(loss)).sum().backward()
    return loss.detach(), h.grad, w.grad


def naive_grads(hidden, weight, labels, **kwargs):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return grads(naive, hidden.to(dtype), weight.to(dtype), labels, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])  # 3 and 4 do not divide the 10 tokens; 64 exceeds them
def test_matches_naive_float32(reduction, chunk_size):
    hidden, weight, labels = make()
    loss, dh, dw = grads(fused_linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)
    ref_loss, ref_dh, ref_dw = naive_grads(hidden, weight, labels, reduction=reduction)
    assert loss.shape == ref_loss.shape and loss.dtype == torch.float32
    assert_close(loss, ref_loss)
    assert_close(dh, ref_dh)
    assert_close(dw, ref_dw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_inputs(dtype, reduction):
    """Computed in float32: the loss matches the float32 formula on the same (rounded) inputs to
    float32 tolerance; the gradients, returned in the input dtype, to that dtype's tolerance."""
    hidden, weight, labels = make(shape=(3, 7), hidden_size=16, vocab=40, dtype=dtype)
    loss, dh, dw = grads(fused_linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_size=5)
    ref_loss, ref_dh, ref_dw = naive_grads(hidden, weight, labels, reduction=reduction)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert_close(loss, ref_loss, torch.float32)
    assert_close(dh, ref_dh, dtype)
    assert_close(dw, ref_dw, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unit_upstream_gradient_and_retained_graph(reduction):
    """``loss.backward()`` (upstream exactly 1) twice on a retained graph accumulates 2x the grads."""
    hidden, weight, labels = make()
    ref_loss = naive(hidden.requires_grad_(), weight.requires_grad_(), labels, reduction=reduction)
    ref_dh, ref_dw = torch.autograd.grad(ref_loss, (hidden, weight))
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=3)
    loss.backward(retain_graph=True)
    assert_close(h.grad, ref_dh)
    assert_close(w.grad, ref_dw)
    loss.backward()
    assert_close(h.grad, 2 * ref_dh)
    assert_close(w.grad, 2 * ref_dw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction):
    hidden, weight, labels = make(shape=(5,), hidden_size=3, vocab=4, dtype=torch.float64, n_ignored=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    fn = lambda h, w: fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    assert_close(fn(hidden, weight), naive(hidden, weight, labels, reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_path(reduction):
    hidden, weight, labels = make()
    expected = naive(hidden, weight, labels, reduction=reduction)
    plain = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=3)
    with torch.no_grad():
        leaves = fused_linear_cross_entropy(
            hidden.requires_grad_(), weight.requires_grad_(), labels, reduction=reduction, chunk_size=3
        )
    for loss in (plain, leaves):
        assert loss.grad_fn is None and not loss.requires_grad
        assert_close(loss, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_gradient_for_one_input_only(reduction, trainable):
    hidden, weight, labels = make()
    ref_loss, ref_dh, ref_dw = naive_grads(hidden, weight, labels, reduction=reduction)
    leaf = hidden if trainable == "hidden" else weight
    leaf.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=4)
    (loss * upstream(loss)).sum().backward()
    other = weight if trainable == "hidden" else hidden
    assert other.grad is None
    assert_close(leaf.grad, ref_dh if trainable == "hidden" else ref_dw)


def test_all_ignored_like_f_cross_entropy():
    hidden, weight, labels = make(n_ignored=10)
    for reduction in REDUCTIONS:
        loss, dh, dw = grads(fused_linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_size=3)
        ref_loss, ref_dh, ref_dw = naive_grads(hidden, weight, labels, reduction=reduction)
        assert_close(loss, ref_loss)  # NaN for "mean", 0 otherwise
        assert_close(dh, ref_dh)
        assert_close(dw, ref_dw)
        assert not dh.any() and not dw.any()


def test_custom_ignore_index_int32_labels_and_single_token():
    hidden, weight, labels = make(shape=(6,))
    labels[labels == IGNORE] = 7
    small = labels.to(torch.int32)
    for reduction in REDUCTIONS:
        loss, dh, dw = grads(fused_linear_cross_entropy, hidden, weight, small, ignore_index=7, reduction=reduction)
        ref_loss, ref_dh, ref_dw = naive_grads(hidden, weight, labels, ignore_index=7, reduction=reduction)
        assert_close(loss, ref_loss)
        assert_close(dh, ref_dh)
        assert_close(dw, ref_dw)
    one = fused_linear_cross_entropy(hidden[0], weight, labels[0], reduction="none", backend="reference")
    assert one.shape == () and torch.allclose(one, naive(hidden[0:1], weight, labels[0:1], reduction="none")[0])


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_never_materialises_all_logits(reduction):
    """No tensor larger than one chunk of logits (8 x 50) appears; all logits would be 64 x 50."""
    hidden, weight, labels = make(shape=(64,), hidden_size=4, vocab=50)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensor() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=8)
        (loss * upstream(loss)).sum().backward()
    assert mode.numel <= 8 * 50 < 64 * 50


def test_out_of_range_label():
    hidden, weight, labels = make(vocab=13)
    labels[0, 0] = 13
    with pytest.raises(ValueError, match=r"labels must be vocabulary ids in \[0, 13\) or ignore_index=-100; got 13"):
        fused_linear_cross_entropy(hidden, weight, labels)
    labels[0, 0] = -1
    with pytest.raises(ValueError, match="got -1"):
        fused_linear_cross_entropy(hidden, weight, labels)


def _bad(**changes):
    hidden, weight, labels = make()
    args = {"hidden": hidden, "weight": weight, "labels": labels, **changes}
    return args.pop("hidden"), args.pop("weight"), args.pop("labels"), args


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"weight": torch.randn(13, 9)}, ValueError, r"hidden's last dim must equal weight's last dim .*\(2, 5, 8\).*\(13, 9\)"),
        ({"weight": torch.randn(13)}, ValueError, r"weight must be \[V, Hd\] with V >= 1, got shape \(13,\)"),
        (
            {"labels": torch.zeros(2, 4, dtype=torch.long)},
            ValueError,
            r"labels shape must be hidden.shape\[:-1\] = \(2, 5\), got \(2, 4\)",
        ),
        ({"labels": torch.zeros(2, 5)}, TypeError, r"labels must be an integer tensor .* got torch.float32; use labels.long\(\)"),
        ({"labels": torch.zeros(2, 5, dtype=torch.bool)}, TypeError, r"labels must be an integer tensor .* got torch.bool"),
        ({"labels": [1, 2]}, TypeError, r"labels must be a torch.Tensor, got list"),
        ({"weight": torch.randn(13, 8, dtype=torch.float64)}, TypeError, r"got torch.float32 and torch.float64; cast one"),
        ({"hidden": torch.ones(2, 5, 8, dtype=torch.long)}, TypeError, r"must share a floating dtype, got torch.int64"),
        ({"weight": torch.randn(13, 8, device="meta")}, ValueError, r"must be on one device, got cpu, meta, cpu"),
        ({"ignore_index": -100.0}, TypeError, r"ignore_index must be an int, got -100.0"),
        ({"reduction": "avg"}, ValueError, r"reduction='avg' is not supported; choose one of mean, sum, none"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be an int >= 1 \(tokens per chunk\), got 0"),
        ({"chunk_size": 2.0}, ValueError, r"chunk_size must be an int >= 1 .* got 2.0"),
        ({"chunk_size": True}, ValueError, r"chunk_size must be an int >= 1 .* got True"),
        ({"process_group": object()}, ValueError, r"process_group was given but torch.distributed is not initialised"),
    ],
)
def test_bad_arguments(changes, error, message, monkeypatch):
    if "process_group" in changes:  # another test in this process may have initialised torch.distributed
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    hidden, weight, labels, kwargs = _bad(**changes)
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
