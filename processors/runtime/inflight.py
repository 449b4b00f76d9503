"""Batches being processed or published right now, so that a rebalance can let them finish.

Why: the processor runs faust with `stream_wait_empty=False` (faust's own wait does not
fit batch agents), so on a rebalance faust revokes partitions while an agent may still be
in the middle of a batch. That batch's table writes would then reach the changelog after
the partition's new owner restored the table from it, and the new owner would not see
them. The app's `on_partitions_revoked` handler (`processors.runtime.app.attach_checkpoint`)
waits (bounded) until no batch is in flight: the rebalance completes, and the new owner
starts its restore, only after the batch's changelog records and outputs were acknowledged. The batch's input offsets may
stay uncommitted; the new owner processes them again, which is idempotent.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class InFlight:
    """`with in_flight:` around a batch; `await in_flight.idle(timeout)` until none is running."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> "InFlight":
        self._count += 1
        self._idle.clear()
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def running(self) -> int:
        return self._count

    async def idle(self, timeout: float) -> bool:
        """True once no batch is in flight; False if some still are after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
