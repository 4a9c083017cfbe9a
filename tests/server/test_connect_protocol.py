"""The Connect framing of ``capsa.server.connect`` against the real SDK's own messages and codec."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator

import pytest

from capsa.server import connect
from capsa.server.connect import ConnectError

process_pb = pytest.importorskip("e2b.envd.process.process_pb")
from e2b.envd.client_shared import ENVD_JSON_CODEC  # noqa: E402
from protobuf import Oneof  # noqa: E402


def sdk_frame(message: object) -> bytes:
    """A request envelope exactly as the SDK's connectrpc client builds it (JSON codec)."""
    body = ENVD_JSON_CODEC.encode(message)
    return struct.pack(">BI", 0, len(body)) + body


def test_parses_the_sdks_start_request() -> None:
    request = process_pb.StartRequest(
        process=process_pb.ProcessConfig(
            cmd="/bin/bash", args=["-l", "-c", "echo hi"], envs={"A": "1"}, cwd="/tmp"
        ),
        stdin=False,
    )
    [message] = connect.parse_envelopes(sdk_frame(request))
    assert message["process"]["cmd"] == "/bin/bash"
    assert message["process"]["args"] == ["-l", "-c", "echo hi"]
    assert message["process"]["envs"] == {"A": "1"}
    assert message["process"]["cwd"] == "/tmp"


def test_parses_the_sdks_signal_and_input_requests() -> None:
    signal = process_pb.SendSignalRequest(
        process=process_pb.ProcessSelector(selector=Oneof("pid", 42)),
        signal=process_pb.Signal.SIGKILL,
    )
    message = connect.parse_message(ENVD_JSON_CODEC.encode(signal))
    assert message == {"process": {"pid": 42}, "signal": "SIGNAL_SIGKILL"}
    stdin = process_pb.SendInputRequest(
        process=process_pb.ProcessSelector(selector=Oneof("pid", 7)),
        input=process_pb.ProcessInput(input=Oneof("stdin", b"ping\n")),
    )
    message = connect.parse_message(ENVD_JSON_CODEC.encode(stdin))
    assert base64.b64decode(message["input"]["stdin"]) == b"ping\n"


def test_the_sdk_decodes_our_stream_events() -> None:
    events = [
        {"event": {"start": {"pid": 12}}},
        {"event": {"data": {"stdout": base64.b64encode(b"out").decode()}}},
        {"event": {"end": {"exitCode": 3, "exited": True, "status": "exit status 3"}}},
    ]
    decoded = []
    for event in events:
        frame = connect.envelope(event)
        flags, length = struct.unpack(">BI", frame[:5])
        assert flags == 0 and length == len(frame) - 5
        decoded.append(ENVD_JSON_CODEC.decode(frame[5:], process_pb.StartResponse))
    assert decoded[0].event.event.value.pid == 12
    assert decoded[1].event.event.value.output.value == b"out"
    assert decoded[2].event.event.value.exit_code == 3


def test_end_stream_carries_the_error() -> None:
    frame = connect.end_stream(ConnectError("deadline_exceeded", "too slow"))
    assert frame[0] == connect.END_STREAM
    assert json.loads(frame[5:]) == {"error": {"code": "deadline_exceeded", "message": "too slow"}}
    assert json.loads(connect.end_stream()[5:]) == {}


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00", b"\x00\x00\x00\x00\x09{}", b"\x01\x00\x00\x00\x02{}", b"\x00\x00\x00\x00\x01["],
)
def test_malformed_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(ConnectError):
        connect.parse_envelopes(data)


def test_unknown_codes_become_unknown() -> None:
    assert ConnectError("bogus", "x").code == "unknown"
    assert ConnectError("not_found", "x").status == 404
    assert connect.timeout_seconds("2500") == 2.5
    assert connect.timeout_seconds("abc") is None


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read_all(data: bytes, size: int, limit: int = connect.MAX_MESSAGE) -> list[dict[str, object]]:
    return [m async for m in connect.read_envelopes(_chunks(data, size), limit)]


def test_reads_the_sdks_stream_input_messages_as_they_arrive() -> None:
    """``StreamInput``'s messages as the SDK sends them, split anywhere across body chunks."""
    from e2b.sandbox.commands.stream_input import stream_input_data, stream_input_start

    body = (
        b"".join(
            sdk_frame(m)
            for m in (
                stream_input_start(7),
                stream_input_data("stdin", "hi\n"),
                stream_input_data("pty", b"\x03"),
            )
        )
        + connect.end_stream()
    )
    for size in (1, 3, 7, len(body)):
        messages = asyncio.run(_read_all(body, size))
        assert messages[0] == {"start": {"process": {"pid": 7}}}
        assert base64.b64decode(messages[1]["data"]["input"]["stdin"]) == b"hi\n"  # type: ignore[index]
        assert base64.b64decode(messages[2]["data"]["input"]["pty"]) == b"\x03"  # type: ignore[index]
        assert len(messages) == 3


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">BI", 0, 10) + b"{}", "invalid_argument"),  # the body ends mid-envelope
        (struct.pack(">BI", 0, 1 << 30), "resource_exhausted"),  # a message past the limit
        (struct.pack(">BI", connect.COMPRESSED, 2) + b"{}", "unimplemented"),
        (struct.pack(">BI", 0, 2) + b"[]", "invalid_argument"),
    ],
)
def test_bad_input_streams_are_rejected(data: bytes, code: str) -> None:
    with pytest.raises(ConnectError) as raised:
        asyncio.run(_read_all(data, 4, limit=1 << 20))
    assert raised.value.code == code
