"""The HTTP shim (PROTOCOL §9): JSON routes over the same services as the framed protocol.

It runs inside the server's nursery tree (``imserver.app``) on hypercorn's
Trio worker, shares the hub, the batch writer and the storage pool, and
parses no HTTP itself: hypercorn (h11) does that, FastAPI routes and
validates, and publishes the OpenAPI document at ``/openapi.json``.
"""

from .server import serve_http

__all__ = ["serve_http"]
