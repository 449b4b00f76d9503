"""`processors.pending_index.PendingIndex`: ticks visit only due pending entries, and after a
rebuild (a restart) also those a replayed tick may have emitted from."""

from __future__ import annotations

from processors import stages
from processors.pending_index import PendingIndex

GRACE = stages.EMITTED_GRACE_MS


def waiting(*deadlines: int, emitted_at: int | None = None) -> dict:
    items = {f"R{i}": {"deadline": d, "conversion": "{}"} for i, d in enumerate(deadlines)}
    if emitted_at is not None:
        items["Rx"] = {"deadline": emitted_at, "conversion": "{}", "out": {"conversion_id": "c"}, "out_json": "{}",
                       "by": "t:0:1", "emitted_at": emitted_at}
    return {"p": 0, "items": items}


def test_only_due_entries_are_visited_in_deadline_order_and_each_once() -> None:
    index = PendingIndex()
    index.rebuild(0, [("A", waiting(300)), ("B", waiting(100, 500)), ("C", waiting(200))], now_ms=0)
    assert index.due(0, 99, limit=10) == []
    assert index.due(0, 250, limit=10) == ["B", "C"]
    assert index.due(0, 250, limit=10) == []  # visited: due again only once the caller schedules it
    index.schedule(0, "B", 500)
    assert index.due(0, 1000, limit=1) == ["A"] and index.due(0, 1000, limit=1) == ["B"]


def test_a_rescheduled_entry_is_visited_at_its_new_time_only() -> None:
    index = PendingIndex()
    index.rebuild(0, [], now_ms=0)
    index.schedule(0, "A", 100)
    index.schedule(0, "A", 400)  # e.g. its items were emitted: next visit when they may be forgotten
    assert index.due(0, 300, limit=10) == []
    assert index.due(0, 400, limit=10) == ["A"]
    index.schedule(0, "A", None)  # deleted
    assert index.due(0, 10_000, limit=10) == []


def test_after_a_rebuild_recent_emitters_are_visited_on_every_tick_for_the_grace_period() -> None:
    """A tick replayed after a restart must find the entries it emitted from, although they are
    not due (their items are out; their next visit is after the grace period)."""
    now = 1_000_000
    index = PendingIndex()
    index.rebuild(0, [("E", waiting(emitted_at=now - 500)), ("OLD", waiting(emitted_at=now - GRACE - 1)),
                      ("W", waiting(now + 5_000))], now_ms=now)
    assert index.due(0, now, limit=10) == ["OLD", "E"]  # OLD is due: its emitted item can be forgotten
    assert index.due(0, now + 1_000, limit=10) == ["E"]  # E again: each replayed tick may need it
    assert index.due(0, now + 5_000, limit=10) == ["W", "E"]
    assert index.due(0, now + GRACE + 1, limit=10) == ["E"]  # its own visit (the item may be forgotten)
    assert index.due(0, now + GRACE + 2, limit=10) == []  # and the window is over


def test_a_partition_is_built_once_until_reset() -> None:
    index = PendingIndex()
    assert not index.built(3)
    index.rebuild(3, [], now_ms=0)
    assert index.built(3) and not index.built(4)
    index.reset()
    assert not index.built(3)


def test_entries_scheduled_before_a_partition_is_built_come_from_the_table() -> None:
    """Regression (two workers, one killed): after a rebalance, a conversion parked on a moved
    partition before that partition's first tick must not make the index look built; the
    entries the old owner parked would then never be visited."""
    index = PendingIndex()
    index.schedule(2, "NEW", 100)  # parked after the rebalance, before partition 2's first tick
    assert not index.built(2) and index.due(2, 10_000, limit=10) == []
    index.rebuild(2, [("OLD", waiting(50)), ("NEW", waiting(100))], now_ms=0)  # both are in the table
    assert index.due(2, 10_000, limit=10) == ["OLD", "NEW"]


def test_following_a_new_rebalance_count_resets_the_index() -> None:
    index = PendingIndex()
    index.follow(1).rebuild(0, [("A", waiting(100))], now_ms=0)
    assert index.follow(1).built(0)  # same rebalance: kept
    assert not index.follow(2).built(0)  # a rebalance: rebuilt from the table on the next tick
