"""jasper-consumer: Patriot commission/decommission events → SIM status in Jasper Control Center.

::

    patriot.events ─▶ router ─▶ work queue per communicator type ─▶ worker ─▶ Control Center
                        │        (single active consumer)              │       (jasper/)
                        │                                              │
                        └───────────▶ patriot.history (signals) ◀──────┘
                        └───────────▶ <prefix>.dead (unreadable messages, exhausted retries)

    config · topology · metrics · probes · log serve every stage; app wires them; cli runs it.
    broker (the RabbitMQ connection) · tls and urls (certificates, proxies, secret-holding
    URLs) serve both ways out.

Stage 1 (``router``) validates each event and either forwards it to its type's
work queue, fails it with a signal (no API call), or dead-letters it. Stage 2
(``worker``) applies jobs in order per SIM within the account's limits and
publishes the result signal. A message is acked only after what it became is
confirmed by the broker (``edge``).
"""

__version__ = "0.1.0"
