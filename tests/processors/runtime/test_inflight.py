"""`processors.runtime.inflight.InFlight`: a rebalance waits until no batch is in flight, bounded."""

from __future__ import annotations

import asyncio

from processors.runtime.inflight import InFlight


def test_idle_waits_for_the_batches_in_flight_and_is_bounded() -> None:
    async def run() -> tuple[bool, bool, bool, int]:
        in_flight = InFlight()
        assert await in_flight.idle(0.01)  # nothing running
        finished: list[bool] = []

        async def batch(seconds: float) -> None:
            with in_flight:
                await asyncio.sleep(seconds)
                finished.append(True)

        task = asyncio.create_task(batch(0.2))
        await asyncio.sleep(0.01)
        too_short = await in_flight.idle(0.05)
        waited = await in_flight.idle(5.0)
        await task
        return too_short, waited, bool(finished), in_flight.running

    too_short, waited, finished, running = asyncio.run(run())
    assert (too_short, waited, finished, running) == (False, True, True, 0)
