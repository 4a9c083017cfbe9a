"""The error a control-plane request answers with. Kept below :mod:`capsa.server.entry` so that
the modules :class:`~capsa.server.entry.Entry` refers to (envd's process table, the interpreter,
the request limits) can raise it without importing the entry (``entry`` re-exports it)."""

from __future__ import annotations

from capsa.errors import CapsaError

__all__ = ["ApiError"]


class ApiError(CapsaError):
    """A control-plane request failed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
