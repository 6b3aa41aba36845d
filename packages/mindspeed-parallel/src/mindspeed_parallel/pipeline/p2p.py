"""Tagged point-to-point tensor transfer over a caller-given process group.

Each transfer is a small int64 header (dtype code, ndim, shape) followed by the data, so the
receiver needs no shape registry. Both messages carry tags derived from the caller's ``tag``;
distinct tags let a schedule post sends and receives in any order between the same two ranks
(gloo, NCCL and HCCL match point-to-point messages by peer and tag). Ranks are ranks *in the group*.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_DIMS = 8
# explicit dtype table: header code <-> dtype (codes are part of the wire format; append only)
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.bool: 6,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def isend_tensor(tensor: torch.Tensor, dst: int, tag: int, group: dist.ProcessGroup | None = None) -> list[dist.Work]:
    """Start sending ``tensor`` (any shape up to 8 dims, dtype in ``DTYPE_CODES``) to group rank
    ``dst``; returns the works to ``wait()`` on. Keep ``tensor`` alive until they complete."""
    if tensor.dtype not in DTYPE_CODES:
        raise TypeError(f"isend_tensor: tensor dtype {tensor.dtype} is unsupported; use one of {list(DTYPE_CODES)}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"isend_tensor: tensor has {tensor.dim()} dims; at most {MAX_DIMS} are supported")
    if tag < 0:
        raise ValueError(f"isend_tensor: tag={tag} must be >= 0")
    header = torch.zeros(2 + MAX_DIMS, dtype=torch.int64)
    header[0], header[1] = DTYPE_CODES[tensor.dtype], tensor.dim()
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    data = tensor.detach().contiguous()
    peer = _global(group, dst)
    return [
        dist.isend(header.to(data.device), peer, group=group, tag=2 * tag),
        dist.isend(data, peer, group=group, tag=2 * tag + 1),
    ]


def recv_tensor(src: int, tag: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Receive (blocking) the tensor that group rank ``src`` sent with ``isend_tensor(..., tag)``."""
    if tag < 0:
        raise ValueError(f"recv_tensor: tag={tag} must be >= 0")
    peer = _global(group, src)
    header = torch.empty(2 + MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, peer, group=group, tag=2 * tag)
    header = header.cpu()
    code, ndim = int(header[0]), int(header[1])
    if code not in _CODE_DTYPES or not 0 <= ndim <= MAX_DIMS:
        raise RuntimeError(f"recv_tensor: corrupt header from rank {src} (tag {tag}): dtype code {code}, ndim {ndim}")
    out = torch.empty(header[2 : 2 + ndim].tolist(), dtype=_CODE_DTYPES[code], device=device)
    dist.recv(out, peer, group=group, tag=2 * tag + 1)
    return out


def wait_all(works: list[dist.Work]) -> None:
    """Wait for every work in ``works`` and empty the list."""
    for work in works:
        work.wait()
    works.clear()
