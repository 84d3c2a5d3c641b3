"""A local Cisco Jasper Control Center stand-in for demos, tests and benchmarks (README, Commands).

It serves the REST API the service calls (:mod:`.server`), keeps accounts with their
own limits and SIMs with their statuses, and injects faults through an admin API.
"""

from .server import (
    Account,
    RequestRecord,
    Simulator,
    accounts_from_settings,
    serve,
    server_context,
)

__all__ = ["Account", "RequestRecord", "Simulator", "accounts_from_settings", "serve",
           "server_context"]
