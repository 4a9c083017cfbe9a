"""What an error may tell a client. Failures of the guest's own making (a missing file, a bad
argument, an output limit) are the client's business and keep their message; failures of the host
(the VM exited, QEMU failed, an image could not be read) carry host paths, QEMU logs and console
tails: the client gets only the error's class and the server log gets the rest."""

from __future__ import annotations

import logging

from capsa.errors import AgentError, CapsaError, ConfigError, ExecTimeoutError
from capsa.server.connect import ConnectError

log = logging.getLogger(__name__)

# Raised for what the client sent or what its guest did; their messages name guest paths only.
_CLIENT_FACING: tuple[type[CapsaError], ...] = (AgentError, ConfigError, ExecTimeoutError, ConnectError)


def client_message(exc: BaseException) -> str:
    """The text a client sees for ``exc``: its message if it is about the request or the guest,
    else its class name only, the full error going to the server log."""
    if isinstance(exc, _CLIENT_FACING):
        return exc.message
    log.warning("sandbox failure (not shown to the client): %s", exc, exc_info=exc)
    return f"the sandbox failed ({type(exc).__name__}); details are in the server log"
