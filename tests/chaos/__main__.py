"""``python -m tests.chaos [--seed N] [--minutes M]``: run the soak, print the verdicts.

Exit 0 when every invariant holds, 1 when one failed, 2 when the soak could not run.
Ctrl-C (or SIGTERM) stops it and still heals every fault (consumer timeout, stopped
nodes) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from pathlib import Path

from .run import run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=None,
                        help="the schedule's seed (default: a new one, printed first)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the active phase (faults and events); the quiet "
                             "phase follows")
    parser.add_argument("--replicas", type=int, default=3, choices=(2, 3))
    parser.add_argument("--broker", choices=("auto", "cluster", "local"), default="auto",
                        help="auto: the 3-node cluster of ../shared/rabbitmq-cluster when it "
                             "answers, else the machine's broker on 5672")
    parser.add_argument("--without", default="",
                        help="fault kinds to leave out, comma-separated (e.g. stop_app,"
                             "consumer_timeout on a broker others use); another plan")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the replicas' and the simulator's logs go "
                             "(default /tmp/jasper-chaos-<seed>-<time>)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    without = frozenset(k.strip() for k in args.without.split(",") if k.strip())
    print(f"seed {seed}", flush=True)

    async def main_task() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        ok, _ = await run_soak(seed, args.minutes, replicas=args.replicas, broker=args.broker,
                               workdir=args.workdir, without=without)
        return 0 if ok else 1

    try:
        return asyncio.run(main_task())
    except asyncio.CancelledError:
        print(f"interrupted; faults healed. seed {seed}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as exc:
        print(f"chaos soak could not run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
