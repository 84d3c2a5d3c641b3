"""Operator tools, set apart from the service: each writes to the stream it is given and
returns the process exit status; a problem that stops it from doing its job at all raises
:class:`ToolError`.

* :mod:`.check` — ``check-config --ping`` and ``sim-status``;
* :mod:`.deadletters` and :mod:`.replay` — ``dead-letters list`` / ``replay``;
* :mod:`.reconcile` — ``reconcile``, a folder of its own: the client list, the listing,
  the mismatches, the fixes, the report and ``make demo-reconcile``;
* :mod:`.account` — a tool's Control Center calls, each made by the service process that
  owns the type while one runs, else by the tool itself; :mod:`.calls` — asking that
  process (the other side of :mod:`jasper_consumer.calls`);
* :mod:`.reach` — what every tool reaches for: the broker, a type by name, its own client;
* :mod:`.tables` — plain-text tables; :mod:`.progress` — a bar or periodic lines;
* :mod:`.demo` — ``make demo``; :mod:`.schemas` — ``make schemas``.
"""

from __future__ import annotations

from ..errors import ToolError

__all__ = ["EXIT_FAILED", "EXIT_OK", "ToolError"]

EXIT_OK = 0
EXIT_FAILED = 1  # the tool ran, and what it checked is not right (a type failed, SIM not found)


