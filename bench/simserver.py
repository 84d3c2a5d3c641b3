"""The Jasper simulator for benchmarks: its own process, no per-request log line.

``python -m bench.simserver`` listens on a free port of 127.0.0.1, prints the API base
URL on stdout, and serves until SIGTERM. Accounts are added through the admin API
(``PUT /_sim/accounts/{user}``) by the scenario that needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

from jasper_consumer.simulator import Simulator


async def _watch_lag(threshold_s: float = 0.01) -> None:
    """Log (stderr) every time this process's event loop was late by over ``threshold_s``:
    a stalled simulator stamps queued requests late, which looks like a burst."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        late = time.monotonic() - before - 0.01
        if late > threshold_s:
            print(f"simulator loop stalled {late * 1000:.1f} ms at {time.monotonic():.3f}",
                  file=sys.stderr, flush=True)


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    sim = Simulator()
    print(await sim.start("127.0.0.1", 0), flush=True)
    watch = asyncio.create_task(_watch_lag())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        watch.cancel()
        await sim.stop()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
