"""The gateway's end of one guest TCP connection (the NAT terminates the guest's TCP).

The guest connects to a remote address; the gateway answers as that remote, and relays the byte
stream to a host socket (passive open, :meth:`TcpEndpoint.accept`). A port forward opens the other
way: the gateway connects to a guest port (active open, :meth:`TcpEndpoint.connect`).

The virtual link never loses or reorders frames, so there is no retransmission timer: what must be
right is sequence numbers, the guest's receive window (never send past it), our own window (never
accept more than we buffer), MSS, FIN in both directions (half-close) and RST. Pure logic: segments
in, segments and stream bytes out; the caller owns sockets and timers.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from capsa.net.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Tcp

OUR_MSS = 1460
OUR_WSCALE = 7
RECEIVE_BUFFER = 1 << 20  # bytes from the guest we hold before the host socket takes them


class State(enum.Enum):
    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    CLOSED = "closed"


def _seq_lt(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) > 0x7FFFFFFF


@dataclass
class TcpEndpoint:
    guest_ip: ipaddress.IPv4Address
    guest_port: int
    remote_ip: ipaddress.IPv4Address
    remote_port: int
    isn: int
    state: State = State.SYN_RECEIVED
    rcv_nxt: int = 0  # next byte expected from the guest
    snd_una: int = 0  # oldest byte the guest has not acknowledged
    snd_nxt: int = 0  # next byte we send
    guest_window: int = 0  # bytes the guest can take beyond snd_una (already scaled)
    guest_wscale: int = 0
    guest_mss: int = 536
    scaling: bool = False
    inbound: bytearray = field(default_factory=bytearray)  # guest -> host, not yet taken
    outbound: bytearray = field(default_factory=bytearray)  # host -> guest, not yet sent
    guest_fin: bool = False  # the guest will send no more
    host_fin: bool = False  # the host side will send no more (FIN queued after outbound)
    fin_sent: bool = False
    syn_ack_sent: bool = False  # a passive open answers nothing before the host connect succeeded

    @classmethod
    def accept(cls, syn: Tcp, guest_ip: ipaddress.IPv4Address, remote_ip: ipaddress.IPv4Address,
               isn: int) -> TcpEndpoint:  # fmt: skip
        """Start from the guest's SYN (after the policy allowed it and the host connect succeeded)."""
        ep = cls(guest_ip, syn.src_port, remote_ip, syn.dst_port, isn & 0xFFFFFFFF)
        ep.rcv_nxt = (syn.seq + 1) & 0xFFFFFFFF
        ep.snd_una = ep.snd_nxt = ep.isn
        ep.scaling = syn.wscale is not None
        ep.guest_wscale = syn.wscale or 0
        ep.guest_window = syn.window  # not scaled in a SYN
        ep.guest_mss = min(syn.mss or 536, OUR_MSS)
        return ep

    @classmethod
    def connect(cls, guest_ip: ipaddress.IPv4Address, guest_port: int,
                remote_ip: ipaddress.IPv4Address, remote_port: int,
                isn: int) -> TcpEndpoint:  # fmt: skip
        """Open a connection to a guest port (a port forward); send :meth:`syn` next."""
        ep = cls(guest_ip, guest_port, remote_ip, remote_port, isn & 0xFFFFFFFF, State.SYN_SENT)
        ep.snd_una = ep.snd_nxt = ep.isn
        return ep

    # -- building segments --

    def _segment(
        self,
        flags: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        mss: int | None = None,
        wscale: int | None = None,
    ) -> bytes:
        return Tcp.build(
            self.remote_ip, self.guest_ip, self.remote_port, self.guest_port,
            seq=self.snd_nxt if seq is None else seq, ack=self.rcv_nxt, flags=flags,
            window=self._our_window(), payload=payload, mss=mss, wscale=wscale,
        )  # fmt: skip

    def _our_window(self) -> int:
        room = max(0, RECEIVE_BUFFER - len(self.inbound))
        if self.state in (State.SYN_SENT, State.SYN_RECEIVED):  # a SYN's window is never scaled
            return min(room, 0xFFFF)
        return min(room >> (OUR_WSCALE if self.scaling else 0), 0xFFFF)

    def syn_ack(self) -> bytes:
        """Our SYN-ACK: only once the host side is connected (until then the guest hears nothing)."""
        self.syn_ack_sent = True
        wscale = OUR_WSCALE if self.scaling else None
        segment = self._segment(TCP_SYN | TCP_ACK, seq=self.isn, mss=OUR_MSS, wscale=wscale)
        self.snd_nxt = (self.isn + 1) & 0xFFFFFFFF
        return segment

    def syn(self) -> bytes:
        """The SYN of an active open (again for a retry: it always carries the initial sequence)."""
        segment = self._segment(TCP_SYN, seq=self.isn, mss=OUR_MSS, wscale=OUR_WSCALE)
        self.snd_nxt = (self.isn + 1) & 0xFFFFFFFF
        return segment

    def reset(self) -> bytes:
        self.state = State.CLOSED
        return self._segment(TCP_RST | TCP_ACK)

    @staticmethod
    def refuse(segment: Tcp, guest_ip: ipaddress.IPv4Address, remote_ip: ipaddress.IPv4Address) -> bytes:
        """The RST answering a segment of no connection we hold (RFC 9293 3.10.7.1): a denied SYN, a
        flow the NAT never opened or no longer knows (after a restore or fork). With an ACK in the
        segment, ``<SEQ=SEG.ACK><CTL=RST>``, the one sequence the guest's window accepts; without,
        ``<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>``. A denial must never look like a hang."""
        if segment.flags & TCP_ACK:
            return Tcp.build(remote_ip, guest_ip, segment.dst_port, segment.src_port,
                             seq=segment.ack, ack=0, flags=TCP_RST, window=0)  # fmt: skip
        length = len(segment.payload) + bool(segment.flags & TCP_SYN) + bool(segment.flags & TCP_FIN)
        return Tcp.build(remote_ip, guest_ip, segment.dst_port, segment.src_port, seq=0,
                         ack=(segment.seq + length) & 0xFFFFFFFF, flags=TCP_RST | TCP_ACK,
                         window=0)  # fmt: skip

    # -- the guest's segments --

    def on_segment(self, tcp: Tcp) -> list[bytes]:
        """Take one segment from the guest; returns the segments to send back."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.SYN_SENT:
            return self._on_syn_sent(tcp)
        if tcp.flags & TCP_RST:
            self.state = State.CLOSED
            return []
        if self.state is State.SYN_RECEIVED and not self.syn_ack_sent:
            return []  # the host connect is pending: a retransmitted SYN must not look answered
        if tcp.flags & TCP_SYN:  # a retransmitted SYN: answer again
            return [self.syn_ack_again()] if self.state is State.SYN_RECEIVED else []
        replies: list[bytes] = []
        if tcp.flags & TCP_ACK:
            self._on_ack(tcp)
        data = bytes(tcp.payload)
        if data or tcp.flags & TCP_FIN:
            if tcp.seq != self.rcv_nxt:
                return [self._segment(TCP_ACK)]  # a duplicate or a gap: tell the guest where we are
            room = RECEIVE_BUFFER - len(self.inbound)
            accepted = data[: max(0, room)]
            self.inbound += accepted
            self.rcv_nxt = (self.rcv_nxt + len(accepted)) & 0xFFFFFFFF
            if tcp.flags & TCP_FIN and len(accepted) == len(data) and not self.guest_fin:
                self.guest_fin = True
                self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
            replies.append(self._segment(TCP_ACK))
        replies += self.pump()
        self._maybe_closed()
        return replies

    def _on_syn_sent(self, tcp: Tcp) -> list[bytes]:
        acceptable = tcp.flags & TCP_ACK and tcp.ack == (self.isn + 1) & 0xFFFFFFFF
        if not acceptable:
            return []  # RFC 9293: an RST or SYN-ACK that does not acknowledge our SYN is ignored
        if tcp.flags & TCP_RST:  # the guest port is closed
            self.state = State.CLOSED
            return []
        if not tcp.flags & TCP_SYN:
            return []
        self.rcv_nxt = (tcp.seq + 1) & 0xFFFFFFFF
        self.snd_una = tcp.ack
        self.scaling = tcp.wscale is not None  # we offered scaling; it holds if the guest did too
        self.guest_wscale = tcp.wscale or 0
        self.guest_window = tcp.window  # not scaled in a SYN-ACK
        self.guest_mss = min(tcp.mss or 536, OUR_MSS)
        self.state = State.ESTABLISHED
        return [self._segment(TCP_ACK), *self.pump()]

    def syn_ack_again(self) -> bytes:
        saved = self.snd_nxt
        self.snd_nxt = self.isn
        segment = self.syn_ack()
        self.snd_nxt = saved
        return segment

    def _on_ack(self, tcp: Tcp) -> None:
        if self.state is State.SYN_RECEIVED and tcp.ack == (self.isn + 1) & 0xFFFFFFFF:
            self.state = State.ESTABLISHED
        if _seq_lt(self.snd_una, tcp.ack) and not _seq_lt(self.snd_nxt, tcp.ack):
            self.snd_una = tcp.ack
        if self.state is State.ESTABLISHED:
            self.guest_window = tcp.window << (self.guest_wscale if self.scaling else 0)

    # -- the host's side --

    def send(self, data: bytes) -> list[bytes]:
        """Queue bytes from the host socket for the guest; returns what can go now."""
        self.outbound += data
        return self.pump()

    def close(self) -> list[bytes]:
        """The host side ended (EOF): FIN after the queued bytes."""
        self.host_fin = True
        return self.pump()

    def take_inbound(self, limit: int) -> tuple[bytes, list[bytes]]:
        """Bytes for the host socket; and a window update if taking them reopened our window."""
        was_closed = self._our_window() == 0
        chunk = bytes(self.inbound[:limit])
        del self.inbound[:limit]
        update = (
            [self._segment(TCP_ACK)] if was_closed and chunk and self.state is not State.CLOSED else []
        )
        return chunk, update

    def in_flight(self) -> int:
        return (self.snd_nxt - self.snd_una) & 0xFFFFFFFF

    def pump(self) -> list[bytes]:
        """Segments that fit the guest's window now."""
        if self.state is not State.ESTABLISHED:
            return []
        segments = []
        while self.outbound:
            room = self.guest_window - self.in_flight()
            size = min(room, self.guest_mss, len(self.outbound))
            if size <= 0:
                break
            chunk = bytes(self.outbound[:size])
            del self.outbound[:size]
            segments.append(self._segment(TCP_ACK | TCP_PSH, chunk))
            self.snd_nxt = (self.snd_nxt + size) & 0xFFFFFFFF
        if self.host_fin and not self.outbound and not self.fin_sent:
            segments.append(self._segment(TCP_FIN | TCP_ACK))
            self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
            self.fin_sent = True
        return segments

    def _maybe_closed(self) -> None:
        if self.guest_fin and self.fin_sent and self.snd_una == self.snd_nxt and not self.inbound:
            self.state = State.CLOSED

    @property
    def closed(self) -> bool:
        self._maybe_closed()
        return self.state is State.CLOSED
