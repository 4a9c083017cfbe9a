"""The blocking facade (``capsa.sync``) is derived from the async API and matches it: every public
async method and property has a sync counterpart with the same parameters, and the declarations
type checkers see (``capsa/sync/_signatures.py``) are the ones the derivation makes."""

from __future__ import annotations

import importlib.util
import inspect
import signal
import threading
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import capsa
from capsa import sync
from capsa.agent.client import Agent
from capsa.agent.exec import ExecBuilder, OutputStream, Process
from capsa.console import Console
from capsa.net.stack import NetworkStack
from capsa.sync import _signatures
from capsa.sync._derive import FACES, Face, face_signature, public_names


def _generator() -> Any:
    """scripts/sync_signatures.py, the generator (a development tool outside the package)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "sync_signatures.py"
    spec = importlib.util.spec_from_file_location("sync_signatures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every async class with a sync face: adding a class here without a face fails below.
TWINS = {
    capsa.SandboxBuilder: sync.SyncSandboxBuilder,
    capsa.VMBuilder: sync.SyncVMBuilder,
    capsa.VM: sync.SyncVM,
    capsa.Sandbox: sync.SyncSandbox,
    capsa.Cluster: sync.SyncCluster,
    Agent: sync.SyncAgent,
    ExecBuilder: sync.SyncExecBuilder,
    Process: sync.SyncProcess,
    OutputStream: sync.SyncOutputStream,
    Console: sync.SyncConsole,
    NetworkStack: sync.SyncNetwork,
}
# Names a face deliberately lacks, and why (anything else missing fails the test).
SKIPPED = {
    Agent: {"channel", "open_connection"},
    NetworkStack: {"start", "close", "send_frame", "send_ip", "on_gateway_frame", "record"},
}
# Async protocols and their blocking counterparts.
DUNDERS = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__aiter__": "__iter__"}


def _params(signature: inspect.Signature) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_every_twin_has_a_face() -> None:
    assert FACES == TWINS
    assert {name for name in sync.__all__ if name.startswith("Sync")} == {
        face.__name__ for face in TWINS.values()
    }


@pytest.mark.parametrize(("twin", "face"), TWINS.items(), ids=lambda c: c.__name__)
def test_face_has_every_public_name_with_the_same_parameters(twin: type, face: type) -> None:
    assert set(face._skipped) == SKIPPED.get(twin, set()), "skips must be listed in this test"
    for name in public_names(twin):
        if name in face._skipped:
            assert not hasattr(face, name)
            continue
        async_member = inspect.getattr_static(twin, name)
        sync_member = inspect.getattr_static(face, name)
        where = f"{face.__name__}.{name}"
        owner = next(klass for klass in face.__mro__ if name in vars(klass))
        assert issubclass(owner, Face), f"{where} is only declared for type checkers, not derived"
        if isinstance(async_member, property):
            assert isinstance(sync_member, property), f"{where} should be a property"
            continue
        assert callable(sync_member), where
        assert not inspect.iscoroutinefunction(sync_member), f"{where} must block, not be async"
        assert _params(inspect.signature(sync_member)) == _params(inspect.signature(async_member)), where
    for async_name, sync_name in DUNDERS.items():
        if hasattr(twin, async_name):
            assert sync_name in vars(face) or any(
                sync_name in vars(base) for base in face.__mro__ if issubclass(base, Face)
            ), f"{face.__name__} lacks {sync_name}"


class Point(NamedTuple):
    x: int
    y: int


def test_a_new_async_method_is_derived_and_checked() -> None:
    """The derivation skips nothing: an async method added to a twin gets a blocking face."""

    class Twin:
        async def poke(self, times: int, *, timeout: float = 1.0) -> str:
            """Poke the guest."""
            return f"poked {times} at {threading.current_thread().name}"

        @property
        def colour(self) -> str:
            return "blue"

        def where(self) -> Point:
            return Point(1, 2)

    class TwinFace(Face, twin=Twin):
        pass

    try:
        assert public_names(Twin) == ["colour", "poke", "where"]
        assert TwinFace(None, Twin()).where() == Point(1, 2)  # type: ignore[attr-defined]
        assert inspect.signature(TwinFace.poke) == face_signature(Twin.poke)  # type: ignore[attr-defined]
        assert TwinFace.poke.__doc__ == "Poke the guest."  # type: ignore[attr-defined]
        face = TwinFace(None, Twin())
        assert face.poke(2).startswith("poked 2 at capsa-call")  # type: ignore[attr-defined]
        assert face.colour == "blue"  # type: ignore[attr-defined]
    finally:
        del FACES[Twin]


@pytest.mark.parametrize("face", TWINS.values(), ids=lambda c: c.__name__)
def test_declarations_for_type_checkers_are_current(face: type[Face]) -> None:
    """_signatures.py is what ``python scripts/sync_signatures.py`` writes (regenerate it if this fails)."""
    declared = getattr(_signatures, f"{face.__name__}Methods")
    assert issubclass(face, declared)
    names = [n for n in public_names(face._twin) if n not in face._skipped]
    assert sorted(n for n in vars(declared) if not n.startswith("_")) == names
    for name in names:
        async_member = inspect.getattr_static(face._twin, name)
        if isinstance(async_member, property):
            assert isinstance(vars(declared)[name], property), name
            continue
        want, have = face_signature(async_member, face), inspect.signature(vars(declared)[name])
        assert _params(have) == _params(want), f"{face.__name__}.{name}"
        assert str(have) == str(want), f"{face.__name__}.{name}"
    assert _generator().signatures_source()  # the generator runs on the faces as they are


@pytest.mark.parametrize("face", TWINS.values(), ids=lambda c: c.__name__)
def test_faces_bind_the_declarations_type_parameters_in_order(face: type[Face]) -> None:
    """A declaration naming another face uses a type parameter named as that face (so _signatures
    imports no face module); the face module binds each to the face of that name, in order."""
    declared = getattr(_signatures, f"{face.__name__}Methods")
    wanted = [p.__name__ for p in getattr(declared, "__parameters__", ())]
    bound = [b for b in getattr(face, "__orig_bases__", ()) if typing.get_origin(b) is declared]
    if not wanted:
        assert not bound
        return
    assert len(bound) == 1, f"{face.__name__} does not bind {declared.__name__}"
    names = [
        a.__forward_arg__ if isinstance(a, typing.ForwardRef) else a.__name__ for a in bound[0].__args__
    ]
    assert names == wanted


def test_sync_builders_chain_like_the_async_ones() -> None:
    builder = sync.sandbox().cpus(2).memory_mb(384).lifetime(60)
    assert isinstance(builder, sync.SyncSandboxBuilder)
    assert (builder.config.cpus, builder.config.memory_mb, builder.config.lifetime) == (2, 384, 60)
    boot = capsa.LinuxDirectBoot("/bin/sh")
    vm_builder = sync.vm(boot).cmdline_arg("console", "ttyS0").qemu_args("-no-reboot")
    assert isinstance(vm_builder, sync.SyncVMBuilder)
    assert vm_builder.config.extra_qemu_args == ("-no-reboot",)
    with pytest.raises(capsa.ConfigError):
        sync.sandbox().cpus(0)


def test_sync_signatures_keep_defaults() -> None:
    assert inspect.signature(sync.SyncProcess.kill).parameters["sig"].default == signal.SIGKILL
    assert "SyncSandbox" in str(inspect.signature(sync.SyncSandbox.fork))


def test_lifetime_names_exist_on_both_faces() -> None:
    for name in ("lifetime",):
        assert hasattr(capsa.SandboxBuilder, name) and hasattr(sync.SyncSandboxBuilder, name)
        assert hasattr(capsa.VMBuilder, name) and hasattr(sync.SyncVMBuilder, name)
    for name in ("set_lifetime", "lifetime_remaining", "lifetime_expired"):
        assert hasattr(capsa.VM, name) and hasattr(sync.SyncVM, name)


def test_a_handle_from_another_loop_thread_is_refused() -> None:
    """A cluster's members share its loop thread: a sandbox with a thread of its own cannot join
    it as a fork source (its objects belong to another event loop)."""
    from capsa._portal import Portal

    class Twin:
        async def take(self, other: object) -> object:
            return other

    class TwinFace(Face, twin=Twin):
        pass

    ours, theirs = Portal("ours"), Portal("theirs")
    try:
        face = TwinFace(ours, Twin())
        member = TwinFace(ours, Twin())
        assert face.take(member)._target is member._target  # type: ignore[attr-defined]
        assert face.take([sync.sandbox()])[0].config.cpus == 1  # type: ignore[attr-defined]
        with pytest.raises(capsa.ConfigError, match="another event-loop thread"):
            face.take(TwinFace(theirs, Twin()))  # type: ignore[attr-defined]
    finally:
        del FACES[Twin]
        ours.close()
        theirs.close()
