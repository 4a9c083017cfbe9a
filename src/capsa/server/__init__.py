"""``capsa serve``: capsa sandboxes behind an API that the E2B SDKs talk to unchanged.

Needs the ``server`` extra (``pip install 'capsa[server]'``): Starlette, uvicorn, prometheus-client.
"""

from capsa.server.app import CapsaServer, ServerConfig, create_app

__all__ = ["CapsaServer", "ServerConfig", "create_app"]
