"""The Connect framing of ``capsa.server.connect`` against the real SDK's own messages and codec."""

from __future__ import annotations

import base64
import json
import struct

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
