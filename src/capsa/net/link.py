"""One guest NIC's link: QEMU's ``-netdev stream`` connects to a unix socket served here (4-byte
big-endian length per Ethernet frame). Frames from the guest go to ``on_frame``; frames to the guest
go through :meth:`Link.send`.

Bounded whatever the guest does: a frame longer than :data:`MAX_FRAME` drops the link, and a guest
that does not read its link gets at most :data:`MAX_BACKLOG` bytes queued. Past that, frames sent
with ``bounded=True`` (everything but the NAT's TCP data, which the receive windows bound already)
are dropped, as a full NIC queue drops them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_FRAME = 65535 + 14
# Bytes queued towards a guest that does not read its link, beyond which droppable frames are
# dropped. Above what TCP legitimately queues: a 100 MB download peaked at 1.4 MiB.
MAX_BACKLOG = 4 << 20


class Link:
    """The host end of one NIC. One QEMU connects once; a second connection is refused."""

    def __init__(self, on_frame: Callable[[memoryview], None]) -> None:
        self._on_frame = on_frame
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self.dropped = 0  # frames dropped because the guest did not read

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_FRAME * 4)
        os.chmod(path, 0o600)

    def backlog(self) -> int:
        """Bytes queued for the guest that it has not read yet."""
        writer = self._writer
        return 0 if writer is None else writer.transport.get_write_buffer_size()

    def send(self, frame: bytes, *, bounded: bool = True) -> bool:
        """Queue one Ethernet frame for the guest; False if it was dropped (no link, or a bounded
        frame past :data:`MAX_BACKLOG`)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        if bounded and writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.dropped += 1
            return False
        writer.write(struct.pack("!I", len(frame)) + frame)
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:  # one QEMU per link
            writer.close()
            return
        self._writer = writer
        try:
            while True:
                header = await reader.readexactly(4)
                (length,) = struct.unpack("!I", header)
                if length > MAX_FRAME:
                    log.warning("guest sent a %d-byte frame; dropping the link", length)
                    return
                frame = await reader.readexactly(length)
                self._on_frame(memoryview(frame))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
