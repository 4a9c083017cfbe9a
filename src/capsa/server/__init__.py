"""``capsa serve``: capsa sandboxes behind an API that the E2B SDKs talk to unchanged.

Needs the ``server`` extra (``pip install 'capsa[server]'``): Starlette, uvicorn, prometheus-client.
"""

from capsa.server._cluster import connect_driver
from capsa.server.app import CapsaServer, ServerConfig, create_app
from capsa.server.quota import TenantLimits
from capsa.server.tenants import ApiKey, KeyRing

__all__ = [
    "ApiKey",
    "CapsaServer",
    "KeyRing",
    "ServerConfig",
    "TenantLimits",
    "connect_driver",
    "create_app",
]
