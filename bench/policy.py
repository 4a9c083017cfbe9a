"""The egress policy's cost on the host's event loop, per policy and per question, against floors:
building a policy of many rules (vs a plain list of as many tuples, and vs the validated matchers
alone), a DNS verdict on it (vs normalizing the name and one dict lookup), and a DNS verdict under
an allowlist of many IP addresses. No guest; pure host CPU.

    .venv/bin/python -m bench.policy [--rules 20000] [--addresses 2000] [--names 200]
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from collections.abc import Callable

from bench._report import figure, header
from capsa.net.policy import Action, Domain, Flow, NetworkPolicy, normalize_name


def _seconds(work: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def _line(what: str, value: float, floor: float, floor_what: str, unit: str) -> None:
    scale = {"s": 1, "ms": 1e3, "us": 1e6}[unit]
    print(
        f"{what:<48} {value * scale:10.1f} {unit}   floor ({floor_what}) {floor * scale:8.1f} {unit}"
        f"   ratio {value / floor:8.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=20_000)
    parser.add_argument("--addresses", type=int, default=2_000)
    parser.add_argument("--names", type=int, default=200)
    args = parser.parse_args()
    header("policy")
    n = args.rules
    names = [f"host{i}.example{i % 97}.test" for i in range(n)]

    def build() -> NetworkPolicy:
        policy = NetworkPolicy.deny_all()
        for name in names:
            policy = policy.allow_domain(name)
        return policy

    built = _seconds(build)
    plain = _seconds(lambda: [(Action.ALLOW, name) for name in names])
    matchers = _seconds(lambda: [(Action.ALLOW, Domain(name)) for name in names])
    _line(f"build a {n}-rule policy (allow_domain each)", built, plain, f"list of {n} tuples", "ms")
    _line("  same, against the validated matchers", built, matchers, f"{n} Domain() in a list", "ms")
    figure("policy_build_ms", built * 1000, "ms")
    figure("policy_build_floor_ms", plain * 1000, "ms")

    policy = build()
    policy.decide_name(names[0])  # the first question builds what later ones share
    asked = [names[(i * 7919) % n] for i in range(args.names)]  # each matches another rule
    verdict = _seconds(lambda: [policy.decide_name(name) for name in asked], runs=1) / len(asked)
    table = dict.fromkeys(names, True)
    floor = _seconds(lambda: [table.get(normalize_name(name)) for name in asked]) / len(asked)
    _line(f"DNS verdict, {n} domain rules, distinct names", verdict, floor, "normalize + dict", "us")
    figure("policy_dns_verdict_us", verdict * 1e6, "us")

    flows = [Flow("tcp", ipaddress.IPv4Address("203.0.113.7"), 443, frozenset({name})) for name in asked]
    flow_verdict = _seconds(lambda: [policy.decide(flow) for flow in flows]) / len(flows)
    _line(f"flow verdict, {n} domain rules", flow_verdict, floor, "normalize + dict", "us")
    figure("policy_flow_verdict_us", flow_verdict * 1e6, "us")

    ips = NetworkPolicy.deny_all()
    for i in range(args.addresses):
        ips = ips.allow_ip(str(ipaddress.IPv4Address(0x0B000000 + i)))
    ips = ips.allow_domain("*.corp.test")
    first = _seconds(lambda: ips.decide_name("a.other.test"), runs=1)  # builds the indexes
    probe = Flow("tcp", ipaddress.IPv4Address("203.0.113.7"), 443, frozenset({"a.other.test"}))
    scan = _seconds(lambda: [rule.matcher.matches(probe) for rule in ips.rules])
    what = f"DNS verdict, {args.addresses} IP rules, first question"
    _line(what, first, scan, "each rule matched once", "ms")
    figure("policy_dns_verdict_ip_allowlist_first_ms", first * 1000, "ms")
    others = [f"n{i}.corp.test" if i % 2 else f"n{i}.other.test" for i in range(args.names)]
    later = _seconds(lambda: [ips.decide_name(name) for name in others]) / len(others)
    what = f"DNS verdict, {args.addresses} IP rules, later questions"
    _line(what, later, floor, "normalize + dict", "us")
    figure("policy_dns_verdict_ip_allowlist_us", later * 1e6, "us")


if __name__ == "__main__":
    main()
