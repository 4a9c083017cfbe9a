"""The NAT's TCP endpoint against a scripted guest: handshake, data both ways within windows,
duplicates, half-close in both directions, resets and refusals."""

from __future__ import annotations

from ipaddress import IPv4Address

from capsa.net.packets import PROTO_TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, IPv4, Tcp
from capsa.net.tcp import OUR_MSS, RECEIVE_BUFFER, State, TcpEndpoint

GUEST, REMOTE = IPv4Address("10.0.2.15"), IPv4Address("93.184.216.34")


def from_guest(seq: int, ack: int, flags: int, payload: bytes = b"", *, window: int = 65535,
               mss: int | None = None, wscale: int | None = None) -> Tcp:  # fmt: skip
    segment = Tcp.build(GUEST, REMOTE, 40000, 443, seq=seq, ack=ack, flags=flags, window=window,
                        payload=payload, mss=mss, wscale=wscale)  # fmt: skip
    return Tcp.parse(IPv4.parse(memoryview(IPv4.build(GUEST, REMOTE, PROTO_TCP, segment))))


def to_guest(segment: bytes) -> Tcp:
    return Tcp.parse(IPv4.parse(memoryview(IPv4.build(REMOTE, GUEST, PROTO_TCP, segment))))


def established(window: int = 65535, wscale: int | None = None) -> tuple[TcpEndpoint, int]:
    syn = from_guest(1000, 0, TCP_SYN, window=window, mss=1400, wscale=wscale)
    ep = TcpEndpoint.accept(syn, GUEST, REMOTE, isn=5000)
    synack = to_guest(ep.syn_ack())
    assert synack.flags == TCP_SYN | TCP_ACK and synack.ack == 1001 and synack.mss == OUR_MSS
    assert ep.on_segment(from_guest(1001, 5001, TCP_ACK, window=window)) == []
    assert ep.state is State.ESTABLISHED
    return ep, 1001


def test_data_from_the_guest_is_acknowledged_and_buffered() -> None:
    ep, seq = established()
    replies = [to_guest(s) for s in ep.on_segment(from_guest(seq, 5001, TCP_ACK | TCP_PSH, b"GET /"))]
    assert replies[0].ack == seq + 5
    assert ep.take_inbound(100)[0] == b"GET /"
    dup = [to_guest(s) for s in ep.on_segment(from_guest(seq, 5001, TCP_ACK, b"GET /"))]
    assert dup[0].ack == seq + 5 and ep.take_inbound(100)[0] == b""  # a duplicate is not delivered twice


def test_data_to_the_guest_respects_mss_and_window() -> None:
    ep, seq = established(window=3000)
    segments = [to_guest(s) for s in ep.send(b"x" * 10_000)]
    assert [len(s.payload) for s in segments] == [1400, 1400, 200]  # guest MSS 1400, window 3000
    assert ep.in_flight() == 3000
    more = [to_guest(s) for s in ep.on_segment(from_guest(seq, 5001 + 3000, TCP_ACK, window=3000))]
    assert sum(len(s.payload) for s in more) == 3000 and more[0].seq == 5001 + 3000


def test_window_scaling_and_our_window_closing() -> None:
    ep, seq = established(window=512, wscale=4)
    ep.on_segment(from_guest(seq, 5001, TCP_ACK, window=512))
    assert ep.guest_window == 512 << 4
    big = b"y" * 1400
    sent = 0
    while ep._our_window() > 0:
        ep.on_segment(from_guest(seq + sent, 5001, TCP_ACK, big, window=512))
        sent += len(big)
        assert sent <= RECEIVE_BUFFER + len(big)
    _, update = ep.take_inbound(1 << 16)
    assert update and to_guest(update[0]).window > 0  # reopening the window tells the guest


def test_half_close_both_ways() -> None:
    ep, seq = established()
    fin = [to_guest(s) for s in ep.on_segment(from_guest(seq, 5001, TCP_FIN | TCP_ACK, b"bye"))]
    assert fin[0].ack == seq + 4 and ep.guest_fin and not ep.closed  # the host may still answer
    out = [to_guest(s) for s in ep.send(b"reply")]
    assert bytes(out[0].payload) == b"reply"
    closing = [to_guest(s) for s in ep.close()]
    assert closing[-1].flags & TCP_FIN
    ep.take_inbound(100)
    ep.on_segment(from_guest(seq + 4, 5001 + 5 + 1, TCP_ACK))
    assert ep.closed


def test_reset_and_refusal() -> None:
    ep, seq = established()
    ep.on_segment(from_guest(seq, 5001, TCP_RST))
    assert ep.closed
    syn = from_guest(7, 0, TCP_SYN)
    refusal = to_guest(TcpEndpoint.refuse(syn, GUEST, REMOTE))
    assert refusal.flags == TCP_RST | TCP_ACK and refusal.ack == 8 and refusal.dst_port == 40000
    again = TcpEndpoint.accept(syn, GUEST, REMOTE, isn=1)
    first = to_guest(again.syn_ack())
    repeated = to_guest(again.on_segment(syn)[0])
    assert repeated.seq == first.seq  # a repeated SYN gets the same SYN-ACK
    assert repeated.flags == first.flags == TCP_SYN | TCP_ACK and repeated.ack == first.ack == 8


def test_active_open_for_a_port_forward() -> None:
    ep = TcpEndpoint.connect(GUEST, 40000, REMOTE, 443, isn=7000)
    syn = to_guest(ep.syn())
    assert syn.flags == TCP_SYN and syn.seq == 7000 and syn.mss == OUR_MSS and syn.wscale == 7
    assert to_guest(ep.syn()).seq == 7000  # a retry repeats the initial sequence
    queued = ep.send(b"early bytes")  # the host may speak before the guest answered
    assert queued == [] and ep.state is State.SYN_SENT
    assert ep.on_segment(from_guest(1, 999, TCP_SYN | TCP_ACK)) == []  # does not ack our SYN
    assert ep.on_segment(from_guest(1, 7001, TCP_RST)) == []  # an RST without ACK is ignored
    assert ep.state is State.SYN_SENT
    replies = [to_guest(s) for s in ep.on_segment(
        from_guest(3000, 7001, TCP_SYN | TCP_ACK, window=1000, mss=1200, wscale=2))]  # fmt: skip
    assert ep.state is State.ESTABLISHED and ep.scaling and ep.guest_wscale == 2
    assert replies[0].flags == TCP_ACK and replies[0].ack == 3001 and replies[0].seq == 7001
    assert replies[1].payload == b"early bytes" and replies[1].seq == 7001
    later = [to_guest(s) for s in ep.on_segment(from_guest(3001, 7012, TCP_ACK, b"hi", window=1000))]
    assert later[0].ack == 3003 and ep.take_inbound(10)[0] == b"hi"
    assert ep.guest_window == 1000 << 2


def test_active_open_refused_by_a_closed_guest_port() -> None:
    ep = TcpEndpoint.connect(GUEST, 40000, REMOTE, 443, isn=7000)
    ep.syn()
    assert ep.on_segment(from_guest(0, 7001, TCP_RST | TCP_ACK)) == []
    assert ep.closed
    assert ep.on_segment(from_guest(1, 7001, TCP_SYN | TCP_ACK)) == []  # nothing after the close


def test_a_refusal_of_a_segment_with_ack_takes_its_sequence_from_that_ack() -> None:
    """RFC 9293 3.10.7.1: the RST answering a segment that carries ACK is <SEQ=SEG.ACK><CTL=RST>.
    A sequence of 0 is outside the guest's window and Linux drops it, so a flow the NAT no longer
    knows (after a restore or fork) hung instead of failing."""
    stray = from_guest(123_456, 987_654, TCP_ACK | TCP_PSH, b"data after a restore")
    rst = to_guest(TcpEndpoint.refuse(stray, GUEST, REMOTE))
    assert rst.flags == TCP_RST and rst.seq == 987_654
    assert (rst.src_port, rst.dst_port) == (443, 40000)
    synack = from_guest(5, 0xFFFFFFFF, TCP_SYN | TCP_ACK)  # a stray SYN-ACK is answered the same way
    assert to_guest(TcpEndpoint.refuse(synack, GUEST, REMOTE)).seq == 0xFFFFFFFF


def test_a_refusal_of_a_segment_without_ack_acknowledges_all_of_it() -> None:
    """<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, where SYN and FIN count in SEG.LEN."""
    cases = [
        (from_guest(0xFFFFFFFF, 0, TCP_SYN), 0),  # wraps around
        (from_guest(100, 0, TCP_SYN), 101),
        (from_guest(100, 0, TCP_PSH, b"abcd"), 104),
        (from_guest(100, 0, TCP_FIN, b"abc"), 104),
        (from_guest(100, 0, TCP_SYN | TCP_FIN, b"xy"), 104),
    ]
    for segment, ack in cases:
        rst = to_guest(TcpEndpoint.refuse(segment, GUEST, REMOTE))
        assert (rst.flags, rst.seq, rst.ack) == (TCP_RST | TCP_ACK, 0, ack), segment


def test_nothing_looks_open_before_the_host_connect_succeeded() -> None:
    """A SYN retransmitted while the host connect is pending must not get a SYN-ACK (a blackholed
    host would look connected, then hang); nor may a guessed ACK open the connection."""
    syn = from_guest(1000, 0, TCP_SYN, mss=1400)
    ep = TcpEndpoint.accept(syn, GUEST, REMOTE, isn=5000)
    assert ep.on_segment(syn) == []
    assert ep.on_segment(from_guest(1001, 5001, TCP_ACK, b"early")) == []
    assert ep.state is State.SYN_RECEIVED and ep.take_inbound(100)[0] == b""
    first = to_guest(ep.syn_ack())  # the host connect succeeded
    again = [to_guest(s) for s in ep.on_segment(syn)]
    assert [(s.flags, s.seq, s.ack) for s in again] == [(first.flags, first.seq, first.ack)]
    assert ep.on_segment(from_guest(1001, 5001, TCP_ACK)) == [] and ep.state is State.ESTABLISHED


def test_a_reset_of_a_live_connection_is_in_the_guests_window() -> None:
    ep, seq = established()
    ep.send(b"abc")
    rst = to_guest(ep.reset())
    assert rst.flags & TCP_RST and rst.seq == 5001 + 3 and rst.ack == seq
