"""Which consumed offsets may be committed: the lowest offset per partition whose jobs are all settled.

One consumed message (a conversion, or a job from the retry topic) becomes zero or more
jobs. The ledger counts, per message, the jobs not yet settled; a message with no jobs is
settled when it is taken. A partition's committable offset is its lowest unsettled
message offset, or, when every message taken is settled, the offset after the last one.
Kafka's committed offset means "everything before this is done", so one slow job holds
back the commit of every later message of its partition (they are redone after a crash,
which the idempotency key makes harmless to count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TP = tuple[str, int]


@dataclass
class PartitionLedger:
    """The unsettled messages of one assigned partition."""

    pending: dict[int, int] = field(default_factory=dict)  # offset -> jobs not yet settled
    next_offset: int | None = None  # one past the highest offset taken
    committed: int | None = None  # the last offset committed (or found committed)
    revoked: bool = False

    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


class Ledger:
    """Per partition: taken offsets and their unsettled job counts. Not thread-safe (one event loop)."""

    def __init__(self) -> None:
        self.partitions: dict[TP, PartitionLedger] = {}

    def take(self, tp: TP, offset: int, jobs: int) -> PartitionLedger:
        """Record a consumed message that produced `jobs` jobs (0: settled now)."""
        part = self.partitions.setdefault(tp, PartitionLedger())
        if jobs > 0:
            part.pending[offset] = part.pending.get(offset, 0) + jobs
        if part.next_offset is None or offset + 1 > part.next_offset:
            part.next_offset = offset + 1
        return part

    def settle(self, part: PartitionLedger, offset: int) -> None:
        """One job of the message at `offset` is settled (its records acknowledged)."""
        left = part.pending.get(offset)
        if left is None:
            return
        if left <= 1:
            del part.pending[offset]
        else:
            part.pending[offset] = left - 1

    def revoke(self, tp: TP) -> None:
        """The partition went to another member: its open jobs no longer move our offsets."""
        part = self.partitions.pop(tp, None)
        if part is not None:
            part.revoked = True

    def to_commit(self) -> dict[TP, int]:
        """Partitions whose committable offset moved past the last commit."""
        out = {}
        for tp, part in self.partitions.items():
            offset = part.committable()
            if offset is not None and (part.committed is None or offset > part.committed):
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TP, int]) -> None:
        for tp, offset in offsets.items():
            part = self.partitions.get(tp)
            if part is not None:
                part.committed = offset

    def unsettled(self) -> int:
        return sum(sum(p.pending.values()) for p in self.partitions.values())
