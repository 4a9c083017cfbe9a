"""capsa.ray without a cluster: the derived remote surface, error transport, builder replay, and
that capsa (and capsa.ray) import without Ray installed."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import capsa
import capsa.ray as cray
from capsa.agent.client import Agent
from capsa.agent.exec import Process
from capsa.ray._host import HostActor, NoSlotError, replay
from capsa.ray._node_policy import PLAIN_CONFIG_FIELDS, NodePolicy, host_parameters
from capsa.ray._surface import BUILDERS, PROXIED, surface
from capsa.ray._wire import decode_error, encode_error
from capsa.sandbox.builder import SandboxConfig


def test_surface_is_the_public_async_api() -> None:
    """Every public coroutine of the agent, process and sandbox classes is reachable (nothing is
    hand-listed), builder methods are recorded, plumbing is not."""
    for cls in (Agent, Process, capsa.Sandbox):
        public = {
            name
            for name, value in inspect.getmembers(cls)
            if not name.startswith("_") and inspect.iscoroutinefunction(value)
        }
        local = {"open_connection"} if cls is Agent else set()  # asyncio streams stay in their loop
        assert public - local <= surface(cls.__name__).calls, cls
    agent = surface("Agent")
    assert agent.chains == {"exec": "ExecBuilder"}
    assert {"read_file", "write_file", "info"} <= agent.calls and "channel" not in agent.calls
    assert "open_connection" not in agent.calls
    builder = surface("ExecBuilder")
    assert {"arg", "args", "env", "cwd", "stdin", "timeout"} <= set(builder.chains)
    assert builder.calls == {"run", "spawn"}
    sandbox = surface("Sandbox")
    assert {"snapshot", "fork", "stop", "kill"} <= sandbox.calls and "port_socket" not in sandbox.calls
    assert {"agent", "network", "status"} <= sandbox.properties
    network = surface("NetworkStack")
    assert "log" in network.calls and not {"send_frame", "start", "close"} & network.calls
    assert surface("OutputStream").iterable
    assert set(surface("SandboxBuilder").chains) >= {"memory_mb", "network", "image", "share"}
    assert set(PROXIED) == {"Sandbox", "Agent", "Process", "OutputStream", "NetworkStack", "Console"}


def test_errors_cross_with_their_class_data_and_hint() -> None:
    """capsa errors take keyword-only arguments (plain pickling cannot rebuild them): they must
    arrive as the same class with the same attributes."""
    errors = [
        capsa.GuestFileNotFoundError("gone", path="/x", errno=2, hint="look elsewhere"),
        capsa.ExecTimeoutError("slow", argv=["sh"], timeout=1.0, stdout=b"a", stderr=b""),
        NoSlotError("full", nodes=[("abc", 3, 3)], hint="add nodes"),
        ValueError("plain"),
    ]
    for original in errors:
        copy = decode_error(encode_error(original), "node abc")
        assert type(copy) is type(original)
        assert str(copy) == str(original)
        if isinstance(original, capsa.CapsaError):
            assert vars(copy) == vars(original) | {"__notes__": copy.__notes__}


def test_builder_replay_checks_names_and_values() -> None:
    built = replay([("memory_mb", (256,), {}), ("cpus", (1,), {})])
    assert (built.config.memory_mb, built.config.cpus) == (256, 1)
    local = capsa.sandbox().memory_mb(384).cpus(2)
    from_local = replay(cray.remote(local).memory_mb(320)._steps)
    assert (from_local.config.memory_mb, from_local.config.cpus) == (320, 2)
    with pytest.raises(capsa.ConfigError):
        replay([("memory_mb", (256,), {}), ("__config__", (local.config,), {})])  # first only
    with pytest.raises(capsa.ConfigError):
        replay([("build", (), {})])  # a coroutine, not a builder method
    with pytest.raises(capsa.ConfigError):
        replay([("memory_mb", (-1,), {})])


@pytest.mark.asyncio
async def test_host_actor_refuses_names_outside_the_surface() -> None:
    host = HostActor(slots=1)
    status, error, _ = await host.call(1, [("read_file", ("/etc/passwd",), {})])
    assert status == "err" and "gone" in decode_error(error, "here").args[0]
    host._register(Agent.__new__(Agent), None)  # no VM needed: the name check comes first
    status, error, _ = await host.call(1, [("_channel", (), {})])
    assert status == "err" and isinstance(decode_error(error, "here"), capsa.ConfigError)
    assert await host.load() == (0, 1)


def test_every_host_naming_parameter_of_the_surface_is_known() -> None:
    """The parameters the node policy checks are derived from annotations; this inventory shows a
    change (a new method taking a path is checked without a change here, but should be seen)."""
    found = set()
    for name, cls in {**PROXIED, **BUILDERS}.items():
        shape = surface(name)
        for method in shape.calls | set(shape.chains):
            found |= {f"{name}.{method}({p})" for p in host_parameters(getattr(cls, method))}
    assert found == {
        "SandboxBuilder.kernel(path)",
        "SandboxBuilder.initrd(path)",
        "SandboxBuilder.rootfs(path)",
        "SandboxBuilder.share(host_path)",
        "SandboxBuilder.from_snapshot(snapshot)",
        "SandboxBuilder.image(image)",
        "SandboxBuilder.volume(volume)",
        "SandboxBuilder.network(network)",
        "Sandbox.snapshot(path)",
        "NetworkStack.add_forward(forward)",
    }
    checked = {"kernel", "initrd", "rootfs", "snapshot", "shares", "image", "network", "volumes"}
    fields = {f.name for f in dataclasses.fields(SandboxConfig)}
    assert fields == checked | PLAIN_CONFIG_FIELDS, "classify the new SandboxConfig field"


def test_replay_hands_the_builder_resolved_paths_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "kernel").write_bytes(b"k")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    policy = NodePolicy(root=tmp_path)
    built = replay([("share", ("link", "/mnt/data"), {}), ("kernel", ("kernel",), {})], policy)
    assert built.config.shares[0].host_path == tmp_path / "data"
    assert built.config.kernel == tmp_path / "kernel"
    with pytest.raises(capsa.ConfigError):
        replay([("share", (), {"host_path": "/etc", "guest_path": "/mnt"})], policy)
    with pytest.raises(capsa.ConfigError):
        replay([("kernel", (), {"path": "/etc/passwd", "extra": 1})], policy)


def test_capsa_imports_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import capsa, capsa.ray as cray\n"
        "b = cray.sandbox().memory_mb(256).node(label='zone=a')\n"
        "assert 'ray' in sys.modules and sys.modules['ray'] is None\n"
        "print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr
