"""envd's ``POST /files`` body, streamed: a ``multipart/form-data`` body (what the E2B SDKs send)
is parsed as it arrives and each file part is handed on as an async iterator of chunks, so the
upload goes to the guest at the guest's pace and the server never holds more than one body chunk
(Starlette's form parser would spool every part to a host temporary file first). An
``application/octet-stream`` body may come gzipped (``Content-Encoding: gzip``, what the SDKs'
``gzip=True`` uploads send): :func:`gunzip` inflates it on the fly, bounded like any upload."""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from capsa.server.limits import RequestRejected

MAX_FIELD_BYTES = 64 << 10  # a part that is not a file (ignored, but its size is bounded)
MAX_PART_HEADERS = 8 << 10
_INFLATE_CHUNK = 1 << 16  # at most this much inflated output per step (a gzip bomb stays bounded)


async def gunzip(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The inflated content of a gzip-encoded body (members may be concatenated), at most
    ``limit`` bytes of it: past that, 413, like an uncompressed upload over the cap. Output is
    produced in bounded steps, so a tiny body that inflates to gigabytes is stopped at ``limit``
    without the server ever holding more than one step of it."""
    inflater = zlib.decompressobj(wbits=31)
    total = 0
    in_member = False  # input of an unfinished gzip member was fed

    def inflate(data: bytes) -> bytes:
        try:
            return inflater.decompress(data, _INFLATE_CHUNK)
        except zlib.error as exc:
            raise RequestRejected(400, f"malformed gzip body: {exc}") from None

    async for chunk in body:
        data = chunk
        while data or in_member:
            in_member = in_member or bool(data)
            out = inflate(data)
            total += len(out)
            if total > limit:
                raise RequestRejected(413, f"the uncompressed upload is larger than {limit} bytes")
            if out:
                yield out
            if inflater.eof:  # this member is done; another may follow in the same body
                data, in_member = inflater.unused_data, False
                inflater = zlib.decompressobj(wbits=31)
            else:
                data = inflater.unconsumed_tail
                if not out and not data:
                    break  # everything fed so far is inflated: the next chunk is needed
    if in_member:
        raise RequestRejected(400, "the gzip body is truncated")


@dataclass
class _Part:
    disposition: bytes = b""
    header_bytes: int = 0
    field_name: bytes = b""
    field_value: bytes = b""


@dataclass
class _Events:
    """What the push parser reported for the body chunks fed so far, in order."""

    items: deque[tuple[str, bytes]] = field(default_factory=deque)
    part: _Part = field(default_factory=_Part)


class MultipartFiles:
    """The file parts of a multipart body: ``async for name, chunks in MultipartFiles(...)``.
    Each part's ``chunks`` must be consumed (or abandoned: the next part skips the rest) before
    the next part is asked for. ``name`` is the part's ``filename`` (``""`` if empty)."""

    def __init__(self, body: AsyncIterator[bytes], content_type: str, max_files: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestRejected(400, "multipart body without a boundary")
        self._body = body
        self._max_files = max_files
        self._files = 0
        self._events = _Events()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )
        self._ended = False
        self._in_file = False

    # -- parser callbacks (synchronous: they only record) --

    def _on_part_begin(self) -> None:
        self._events.part = _Part()

    def _header_bytes(self, n: int) -> None:
        self._events.part.header_bytes += n
        if self._events.part.header_bytes > MAX_PART_HEADERS:
            raise RequestRejected(413, "a multipart part's headers are too large")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._events.part.field_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._events.part.field_value += data[start:end]

    def _on_header_end(self) -> None:
        part = self._events.part
        if part.field_name.lower() == b"content-disposition":
            part.disposition = part.field_value
        part.field_name = part.field_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._events.part.disposition)
        filename = options.get(b"filename")
        if filename is None:
            self._events.items.append(("field", b""))
            return
        self._files += 1
        if self._files > self._max_files:
            raise RequestRejected(413, f"more than {self._max_files} files in one upload")
        self._events.items.append(("file", filename))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.items.append(("data", bytes(data[start:end])))

    def _on_part_end(self) -> None:
        self._events.items.append(("end", b""))

    # -- async side --

    async def _next_event(self) -> tuple[str, bytes] | None:
        while not self._events.items:
            if self._ended:
                return None
            chunk = await anext(self._body, None)
            try:
                if chunk is None:
                    self._ended = True
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except RequestRejected:
                raise
            except Exception as exc:  # python-multipart's parse errors
                raise RequestRejected(400, f"malformed multipart body: {exc}") from None
        return self._events.items.popleft()

    def __aiter__(self) -> MultipartFiles:
        return self

    async def __anext__(self) -> tuple[str, AsyncIterator[bytes]]:
        field_bytes = 0
        in_field = False
        while (event := await self._next_event()) is not None:
            kind, value = event
            if kind == "file":
                self._in_file = True
                return value.decode("utf-8", "replace"), self._file_chunks()
            if kind == "field":
                in_field, field_bytes = True, 0
            elif kind == "data" and in_field:
                field_bytes += len(value)
                if field_bytes > MAX_FIELD_BYTES:
                    raise RequestRejected(413, f"a form field is larger than {MAX_FIELD_BYTES} bytes")
            elif kind == "end":
                in_field = False
            # data of an abandoned file part is skipped here
        raise StopAsyncIteration

    async def _file_chunks(self) -> AsyncIterator[bytes]:
        while self._in_file and (event := await self._next_event()) is not None:
            kind, value = event
            if kind == "end":
                self._in_file = False
                return
            if kind == "data" and value:
                yield value
        if self._in_file:
            raise RequestRejected(400, "the multipart body ended inside a file part")
