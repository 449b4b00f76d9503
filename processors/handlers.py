"""What each agent does with one event: the stages of `processors.stages` around the tables.

`StageHandlers` holds the partner config, the three tables and what expiry needs; each
handler takes `(event, partition, now_ms)` and returns the event's outputs, with the event
already set as the current one (table writes go to its partition). How events arrive, in
batches, and when their outputs and table changes are committed is the runtime's
(`processors.runtime`); nothing here knows faust or Kafka beyond an event's key, value and
position.

- `verify` (raw-postbacks): reject, or forward to the dedupe topic.
- `dedupe` (internal dedupe topic, envelopes): the dedupe table; ticks expire it.
- `attribute` (internal attribute topic, envelopes): the join with the clicks table;
  conversions without their click wait in the pending table; ticks forget clicks past the
  click horizon and expire pending entries whose wait is over.
- `clicks` (clicks topic): fill the clicks table, attribute the conversions waiting for it.
- `commission` (internal commission topic, envelopes, keyed by advertiser): every conversion
  the stages above emit goes through it; the payout engine (`processors.commission`) runs on
  the commission table shard of the conversion's advertiser. One advertiser's conversions all
  meet on one partition, so the caps and tiers of its offers, and the payments of its orders,
  are counted in one place: exact, whatever the number of workers. A message `{"backfill": conversion_id}` (sent by `postback fx backfill` to the
  partition of the conversion's commission key) recomputes a conversion stored with
  `fx_missing` once its rates are known (`processors.commission.recompute_fx`) and emits
  it again, as the same version; nothing when it is not waiting or a rate is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from postback.config import ProcessOptions
from postback.partners import DEFAULT_DEDUPE_HORIZON_DAYS, PartnerConfig
from postback.fx import FxRates
from processors import stages
from processors.commission import StateOverlay, commission, recompute_fx
from processors.metrics import ProcessorMetrics
from processors.pending_index import PendingIndex
from processors.runtime.publish import decode_envelope
from processors.sweep import Sweep
from schemas.codec import Codec, CodecError

log = logging.getLogger("processors")

#: The key of the records sent to every partition of the internal topics each second.
TICK = b"__tick__"
#: Pending entries visited per tick of a partition at most (the rest on the next ticks, a second apart).
PENDING_VISITS_PER_TICK = 5_000


#: The field of a commission-topic message asking to recompute a conversion's FX: `{"backfill": conversion_id}`.
BACKFILL = "backfill"


def commission_key(conversion: dict[str, Any]) -> str:
    """The commission topic's key: the advertiser.

    Every offer belongs to one advertiser, so every cap and tier scope (an offer, an offer
    and affiliate) is decided on one partition; and so is every order of the advertiser,
    so a refund that comes with the order id only (no click, no offer) meets what was
    paid for that order. The price: one advertiser's commission decisions run on one worker.
    """
    return conversion["advertiser_id"]


def to_commission(outputs: Iterable[stages.Output]) -> list[stages.Output]:
    """The stages' conversions go to the commission stage first; other outputs are unchanged."""
    return [stages.Output("commission", commission_key(out.record), out.record) if out.kind == "conversion" else out
            for out in outputs]


def event_id(event: Any) -> str:
    """Where an event sits in Kafka: replaying it yields the same id (see stages._release)."""
    message = event.message
    return f"{message.topic}:{message.partition}:{message.offset}"


class StageHandlers:
    """The four agents' handlers over one worker's tables.

    `rebalances()` counts the rebalances so far: the pending index is rebuilt per partition
    after each (partitions may have moved meanwhile).
    """

    def __init__(self, partners: PartnerConfig, opts: ProcessOptions, dedupe: Any, clicks: Any, pending: Any,
                 metrics: ProcessorMetrics, rebalances: Callable[[], int], commission_table: Any = None,
                 fx: FxRates | None = None) -> None:
        self.partners = partners
        self.dedupe_table, self.clicks_table, self.pending_table = dedupe, clicks, pending
        self.commission_table = commission_table if commission_table is not None else {}
        self.fx = fx if fx is not None else FxRates()
        self.metrics = metrics
        self._rebalances = rebalances
        self._wait_ms = int(opts.late_click_wait_s * 1000)
        cleanup_ms = int(opts.cleanup_interval_s * 1000)
        self._dedupe_sweep = Sweep(dedupe.partition_items, opts.cleanup_chunk, cleanup_ms)
        self._clicks_sweep = Sweep(clicks.partition_items, opts.cleanup_chunk, cleanup_ms)
        self._click_horizon_ms = opts.click_horizon_ms(partners.longest_attribution_window_days())
        self._pending_index = PendingIndex()  # use through self._pending_index.follow(self._rebalances())
        self._raw_codec = Codec.for_record("RawPostback")
        self._click_codec = Codec.for_record("Click")

    def verify(self, event: Any, _partition: int, now: int) -> list[stages.Output]:
        raw = self._decoded(self._raw_codec, event)
        return [] if raw is None else [stages.verify(raw, self.partners, now)]

    def dedupe(self, event: Any, partition: int, now: int) -> Iterable[stages.Output]:
        if event.key == TICK:
            return self.dedupe_tick(partition, now)
        return to_commission([stages.dedupe(msg, self.dedupe_table, partition, now)
                              for msg in decode_envelope(event.value)])

    def dedupe_tick(self, partition: int, now: int) -> list[stages.Output]:
        """Expire the next chunk of the partition's dedupe entries past their horizon."""
        removed = stages.expire_dedupe(self._dedupe_sweep.next_chunk(partition, now), self.dedupe_table, now,
                                       default_horizon_ms=DEFAULT_DEDUPE_HORIZON_DAYS * 86_400_000)
        if removed:
            self.metrics.expired.labels("dedupe").inc(removed)
            log.info("expired %d dedupe entries on partition %d", removed, partition)
        return []

    def attribute(self, event: Any, partition: int, now: int) -> Iterable[stages.Output]:
        if event.key == TICK:
            return self.attribute_tick(partition, now, event_id(event))
        outputs: list[stages.Output] = []
        for conversion in decode_envelope(event.value):
            attributed = stages.attribute_conversion(conversion, self.clicks_table, self.pending_table, partition,
                                                     self.partners, now, self._wait_ms)
            index = self._pending_index.follow(self._rebalances())
            if not attributed and index.built(partition):  # waits for its click
                click_id = conversion["click_id"]
                index.schedule(partition, click_id, stages.next_visit_ms(self.pending_table.get(click_id)))
            outputs.extend(attributed)
        return to_commission(outputs)

    def attribute_tick(self, partition: int, now: int, tick_id: str) -> list[stages.Output]:
        """Forget the next chunk of clicks past the click horizon, then release the pending
        conversions whose wait is over (`tick_id` makes their outputs' ids replay-stable)."""
        removed = stages.expire_clicks(self._clicks_sweep.next_chunk(partition, now), self.clicks_table, now,
                                       self._click_horizon_ms)
        if removed:
            self.metrics.expired.labels("clicks").inc(removed)
            log.info("forgot %d clicks older than the click horizon on partition %d", removed, partition)
        return to_commission(self._expire_pending(partition, now, tick_id))

    def clicks(self, event: Any, _partition: int, now: int) -> Iterable[stages.Output]:
        click = self._decoded(self._click_codec, event)
        return [] if click is None else to_commission(stages.click_arrived(
            click, self.clicks_table, self.pending_table, self.partners, now, event_id(event)))

    def commission(self, event: Any, _partition: int, now: int) -> list[stages.Output]:
        """The payout of each conversion, on its advertiser's partition; the final Conversion record.

        A backfill message yields the conversion's recomputed record, or nothing (see the module docstring).
        """
        if event.key == TICK:
            return []
        outputs: list[stages.Output] = []
        # One overlay per envelope: a key every conversion touches (an offer's cap counters)
        # is written to the table, and its changelog, once per envelope, not once per conversion.
        state = StateOverlay(self.commission_table)
        for record in decode_envelope(event.value):
            if BACKFILL in record:
                cid = record[BACKFILL]
                again = recompute_fx(cid, self.partners, state, self.fx, now)
                if again is not None:
                    outputs.append(stages.Output("conversion", cid, again))
                continue
            outputs.append(stages.Output("conversion", record["conversion_id"],
                                         commission(record, self.partners, state, self.fx, now)))
        state.commit()
        return outputs

    def _expire_pending(self, partition: int, now: int, tick_id: str) -> list[stages.Output]:
        # After a rebalance every partition is rebuilt from its table on its next tick
        # (entries parked meanwhile are in the table).
        index = self._pending_index.follow(self._rebalances())
        if not index.built(partition):
            index.rebuild(partition, self.pending_table.partition_items(partition)[0], now)
        visit = [(click_id, waiting) for click_id in index.due(partition, now, PENDING_VISITS_PER_TICK)
                 if (waiting := self.pending_table.get(click_id)) is not None]
        outputs, after = stages.expire_pending(visit, self.pending_table, self.partners, now, tick_id)
        for click_id, waiting in after.items():
            index.schedule(partition, click_id, stages.next_visit_ms(waiting))
        return outputs

    def _decoded(self, codec: Codec, event: Any) -> dict[str, Any] | None:
        try:
            return codec.decode(event.value)
        except CodecError as exc:  # not written by our ingester: no receipt to answer for
            log.error("skipping an undecodable %s at %s: %s", codec.name, event_id(event), exc)
            self.metrics.skipped.labels(event.message.topic).inc()
            return None
