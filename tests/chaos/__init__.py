"""``make chaos``: a seeded, randomized fault soak of the real service.

Two or three replicas of ``jasper-consumer run`` (subprocesses), the simulator, and the
broker — the 3-node cluster of ``../shared/rabbitmq-cluster`` when it answers, else the
machine's own — with a loopback TCP proxy between each replica and each broker node. A
steady mix of events over a few hundred SIMs meets faults drawn from kill -9 and SIGTERM
of a replica (then restarted), closed broker connections, ``stop_app``/``start_app``, the
broker's consumer timeout firing, a proxy that blackholes or resets, API 5xx storms,
rate-limit answers, a hanging API, a wrong key later fixed, an account down then up, and
poison messages. Afterwards it checks the invariants of ``invariants.py`` and prints what
it injected, what it published, each invariant's verdict and the seed to replay it.

It is black-box: it sees the service only as an operator would (processes and their exit
codes, ``/readyz``, ``/metrics``, the broker's queues, the history queue's signals, the
simulator's request log), so it holds however the service's insides change.

Why here, under ``tests/``: it is a test of the service, not part of it (nothing of it
ships in the package), and it reuses the reliability harness
(``tests/reliability/conftest.py``) by import. ``python -m tests.chaos`` (``make chaos``)
runs a soak of any length; ``test_chaos.py`` runs a short fixed-seed one in ``make test``.

::

    schedule   the plan from one random.Random(seed): events and faults, when, on what
    proxy      the loopback TCP proxy (pass, blackhole, reset)
    brokers    which broker, and its faults (connections, stop_app, consumer timeout)
    replicas   the service's processes
    faults     carrying out each fault kind, and healing them all
    soak       the phases: start, active, quiet, observe
    invariants the checks, from the observations alone
    report     the printout
    run        seed -> plan -> soak -> verdicts -> report
    timeline   after a run: its logs and faults on the soak's clock, around a moment
"""
