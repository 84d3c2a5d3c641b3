"""The Control Center client, split by concern:

* :mod:`.client` — :class:`JasperClient`: Basic auth, one request per call, one per account;
* :mod:`.answers` — an HTTP answer or a network failure → an error (pure functions);
* :mod:`.limiter` — :class:`Limiter`: calls in flight and spacing of call starts;
* :mod:`.retry` — :func:`change_status`: a status change with back-off, under the pause.
"""

from .client import JasperClient
from .limiter import Limiter

__all__ = ["JasperClient", "Limiter"]
