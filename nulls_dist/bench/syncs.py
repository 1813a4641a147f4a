"""Counting host-device synchronisation points (the tests of the hot path and the training benchmark use it).

On the CPU: a TorchDispatchMode that records every ATen op
whose result on a CUDA device would force the host to wait for the device (a value read back, or an output
whose size depends on the data). On the CPU nothing waits, but the same ops run, so a count of zero here means
the code issues none of them; on a GPU, `torch.cuda.set_sync_debug_mode("error")` checks the same thing."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# value read back to the host, or data-dependent output sizes (the device must finish before the host can
# allocate the result)
SYNC_PACKETS = {
    aten._local_scalar_dense, aten.is_nonzero, aten.item, aten.equal, aten.allclose,
    aten.nonzero, aten.nonzero_numpy, aten.argwhere, aten.masked_select, aten.masked_scatter,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
    aten.bincount, aten.histc, aten._assert_async, aten.to_sparse,
}


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c: ...` then `c.counts` (op name -> calls) and `c.total`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_PACKETS:
            self.counts[str(func)] += 1
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and \
                isinstance(args[0] if args else None, torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
            self.counts[str(func)] += 1  # data-dependent repeats without a given output size
        elif packet is aten.index and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.counts[str(func) + "(bool mask)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_cuda_syncs(fn) -> tuple[object, int]:
    """Run `fn()` with torch's CUDA sync debug mode at "warn" and count the synchronisations it reports."""
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return result, sum("synchroniz" in str(w.message) for w in caught)
