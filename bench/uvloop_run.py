"""``jasper-consumer`` on uvloop's event loop: ``python -m bench.uvloop_run run --config …``.

The service itself is unchanged; only the loop ``asyncio.run`` creates differs, so the
two can be compared in one benchmark run.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from jasper_consumer.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main())
