"""dW detach: run a backward that computes input gradients now and weight gradients later.

Zero-bubble style schedules split a backward pass into B (input gradients, on the critical path to
the previous stage) and W (weight gradients, free to fill idle slots). ``WeightGradLinear`` is an
``nn.Linear`` whose backward, while its ``WeightGradStore`` is capturing, returns only the input
gradient and queues a closure that later accumulates ``weight.grad`` / ``bias.grad``. One
captured backward is one queue entry; ``pop()`` runs the oldest entry (FIFO, as the schedules
pair each W with the earliest deferred B).

Only ``WeightGradLinear`` layers defer; other parameters (norms, embeddings, plain ``nn.Linear``)
get their gradients during B as usual, which is still correct, just not deferred. The store is an
object the caller owns and binds to modules (``bind_weight_grad_store``): there is no global state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """FIFO of deferred weight-gradient groups (one group per captured backward)."""

    def __init__(self) -> None:
        self._group: list[Callable[[], None]] | None = None
        self._queue: deque[list[Callable[[], None]]] = deque()

    @property
    def capturing(self) -> bool:
        """True inside ``capture()``: deferrable layers queue their dW instead of computing it."""
        return self._group is not None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Run a backward inside this block to defer its weight gradients as one queue entry."""
        if self._group is not None:
            raise RuntimeError("WeightGradStore.capture() is already active; captures do not nest")
        self._group = []
        try:
            yield
        finally:
            group, self._group = self._group, None
        self._queue.append(group)

    def put(self, fn: Callable[[], None]) -> None:
        """Queue one weight-gradient closure into the current capture."""
        if self._group is None:
            raise RuntimeError("WeightGradStore.put() outside capture(); wrap the backward in store.capture()")
        self._group.append(fn)

    def pop(self) -> None:
        """Compute the oldest deferred group of weight gradients (accumulating into ``.grad``)."""
        if not self._queue:
            raise RuntimeError("WeightGradStore.pop() on an empty queue; every W needs an earlier captured B")
        for fn in self._queue.popleft():
            fn()

    def flush(self) -> None:
        """Compute every deferred group, oldest first."""
        while self._queue:
            self.pop()

    def __len__(self) -> int:
        return len(self._queue)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    # same semantics as autograd's AccumulateGrad for a dense leaf
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def _weight_grads(x: torch.Tensor, grad_out: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]))
    return grad_w, (g2.sum(0) if has_bias else None)


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.store = bias is not None, store
        # the deferred closure accumulates into the leaf parameters themselves
        ctx.weight_and_bias = (weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if not (want_w or want_b):  # frozen layer: nothing to compute or defer
            return grad_x, None, None, None
        if ctx.store.capturing:
            weight_param, bias_param = ctx.weight_and_bias

            def deferred() -> None:
                grad_w, grad_b = _weight_grads(x, grad_out, want_b)
                if want_w:
                    _accumulate(weight_param, grad_w)
                if want_b:
                    _accumulate(bias_param, grad_b)

            ctx.store.put(deferred)
            return grad_x, None, None, None
        grad_w, grad_b = _weight_grads(x, grad_out, want_b)
        return grad_x, grad_w if want_w else None, grad_b, None


class WeightGradLinear(nn.Linear):
    """``nn.Linear`` that can defer its weight gradient to a ``WeightGradStore``.

    Shapes as ``nn.Linear``: input ``[..., in_features]`` -> output ``[..., out_features]``.
    With ``weight_grad_store`` None (the default) it is exactly ``nn.Linear``.
    """

    weight_grad_store: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.weight_grad_store
        if store is None or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _DeferrableLinear.apply(x, self.weight, self.bias, store)


def bind_weight_grad_store(module: nn.Module, store: WeightGradStore | None) -> int:
    """Point every ``WeightGradLinear`` under ``module`` at ``store`` (None unbinds); returns how many."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, WeightGradLinear):
            sub.weight_grad_store = store
            count += 1
    return count


def convert_linears(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` under ``module`` (in place) by a ``WeightGradLinear`` that
    shares the same ``Parameter`` objects; returns ``module`` (or the replacement if it is a Linear)."""
    if type(module) is nn.Linear:
        return _as_weight_grad_linear(module)
    for name, child in module.named_children():
        setattr(module, name, convert_linears(child))
    return module


def _as_weight_grad_linear(linear: nn.Linear) -> WeightGradLinear:
    new = WeightGradLinear.__new__(WeightGradLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
    return new
