"""What ``capsa serve`` keeps across restarts and crashes (``--state-dir``): the records of its
sandboxes, named snapshots and ended sandboxes, written at each change of state
(:class:`Journal`), and read back at the next start (:meth:`Journal.recover`).

What a restart needs of a paused sandbox is everything its entry held that the guest does not:
its id, tenant, template, metadata, environment, lifecycle, timeout, network policy, ingress
setting, envd access token (the traffic token is derived from it, so it is not stored), and the
guest pids of its commands and code interpreter, which the first resume after the restart takes up
again (a pause keeps the processes in the guest). A running sandbox's row says only that it ran: if
the server dies with it, the next start records its end as ``server_crashed``."""

from __future__ import annotations

import contextlib
import datetime
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import capsa
from capsa.errors import CapsaError
from capsa.net.policy import Action, Cidr, Domain, NetworkPolicy, Rule
from capsa.sandbox.files_snapshot import is_files_snapshot
from capsa.server.carry import Carried, carry_over
from capsa.server.entry import ApiError, Entry
from capsa.server.exposure import is_public, mask_host, set_mask_host, set_public
from capsa.server.limits import Limits
from capsa.server.snapshots import Saved
from capsa.server.statedb import PARTIAL, StateDB
from capsa.vm import RunState

log = logging.getLogger(__name__)

END_REASONS = (
    "killed",  # DELETE /sandboxes/{id} (Sandbox.kill) of a running sandbox
    "paused_then_killed",  # ... of a paused one
    "timeout",  # its timeout ended it (on_timeout='kill')
    "guest_crashed",  # its VM stopped on its own; the detail is the console's tail
    "host_error",  # the server could not keep it (a failed pause at its timeout, lost files)
    "server_shutdown",  # running at SIGTERM and not paused within --shutdown-timeout
    "server_crashed",  # running when the server died (kill -9, a crash): found at the next start
    "node_lost",  # --ray: its node, or the host actor that ran it, died (with its VM)
)
DEFAULT_KEEP_ENDED = 24 * 3600.0  # seconds an end record is kept (--keep-ended)
MAX_DETAIL = 4000  # characters of an end's detail (a console tail)
_PRUNE_EVERY = 60.0  # seconds between drops of the end records older than --keep-ended
_RESTART_CARRY = "restart_carry"  # Entry.extra: the guest processes to take up at the next resume


class Journal:
    """The server's side of the state dir: every method is a few small SQLite statements."""

    def __init__(
        self,
        db: StateDB,
        *,
        keep_ended: float = DEFAULT_KEEP_ENDED,
        limits: Limits | None = None,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.keep_ended = keep_ended
        self.limits = limits or Limits()
        self.on_end = on_end
        self._pruned = time.monotonic()

    @property
    def paused_root(self) -> Path:
        return self.db.paused_root

    @property
    def snapshots_root(self) -> Path:
        return self.db.snapshots_root

    def close(self) -> None:
        self.db.close()

    # -- sandboxes --

    def running(self, entry: Entry) -> None:
        """``entry`` runs (created, restored or resumed): its row says so, with no files."""
        with _recording(entry, "run"):
            self.db.put_sandbox(entry.id, state="running", directory=None, record=_record(entry))

    def paused(self, entry: Entry, directory: Path) -> None:
        """``entry``'s pause is complete: its snapshot is fully written at ``directory``."""
        with _recording(entry, "pause"):
            self.db.put_sandbox(entry.id, state="paused", directory=directory, record=_record(entry))

    def changed(self, entry: Entry) -> None:
        """A setting kept in the record changed (the network policy, say)."""
        if entry.paused is not None:
            self.paused(entry, entry.paused)
        elif not entry.pausing:
            self.running(entry)

    def ended(self, entry: Entry, reason: str, detail: str = "") -> None:
        """Record ``entry``'s end; never raises (a removal must not fail on its record)."""
        end = {
            "tenant": entry.tenant,
            "template": entry.template,
            "reason": reason,
            "detail": detail[-MAX_DETAIL:],
            "started": entry.started_at.timestamp(),
            "ended": time.time(),
            "metadata": entry.metadata,
        }
        try:
            self.db.end_sandbox(entry.id, end)
            if time.monotonic() - self._pruned > _PRUNE_EVERY:  # the records stay bounded
                self._pruned = time.monotonic()
                self.db.prune_ends(time.time() - self.keep_ended)
        except sqlite3.Error as exc:
            log.error("recording the end of sandbox %s (%s) failed: %s", entry.id, reason, exc)
        if self.on_end is not None:
            self.on_end(reason)

    def ends(self, tenant: str | None, limit: int) -> list[dict[str, Any]]:
        self.db.prune_ends(time.time() - self.keep_ended)
        return self.db.ends(tenant, limit)

    def recover(self) -> list[Entry]:
        """At start: record the sandboxes a crash ended, remove what a crash left half-done, and
        return the paused sandboxes (without a VM until their resume)."""
        kept: list[Entry] = []
        for sandbox_id, state, directory, record in self.db.sandboxes():
            entry = _entry(sandbox_id, record, directory)
            if state != "paused":
                self.ended(entry, "server_crashed", "running when the server stopped without a shutdown")
            elif directory is None or not (directory / "snapshot.json").is_file():
                self.ended(entry, "host_error", f"its paused files are missing ({directory})")
            else:
                kept.append(entry)
        removed = self.db.sweep()
        pruned = self.db.prune_ends(time.time() - self.keep_ended)
        log.info(
            "state dir %s: %d paused sandboxes, %d snapshots kept; %d leftovers removed, %d old "
            "end records dropped",
            self.db.root,
            len(kept),
            len(self.db.snapshots()),
            removed,
            pruned,
        )
        return kept

    async def take_up(self, entry: Entry) -> None:
        """After the first resume since a restart: take up the guest's commands and interpreter
        that the pause kept (as a resume within one server run does); never raises."""
        carry = entry.extra.pop(_RESTART_CARRY, None)
        if carry:
            await carry_over(carried_of(carry, self.limits), entry)

    # -- snapshots --

    def snapshot_dir(self, raw: str) -> Path:
        """Where a new snapshot is written: renamed to its final name by :meth:`keep_snapshot`."""
        return self.snapshots_root / f"{raw}{PARTIAL}"

    def keep_snapshot(self, saved: Saved) -> None:
        """The snapshot is complete: rename its directory, then commit its row (the order a crash
        needs: a directory without a row is swept at the next start)."""
        final = self.snapshots_root / saved.id
        saved.path.rename(final)
        saved.path = final
        self.put_snapshot(saved)

    def put_snapshot(self, saved: Saved) -> None:
        """Write ``saved``'s row (new, or its name moved to a newer snapshot)."""
        record = {
            "name": saved.name,
            "template": saved.template,
            "source_id": saved.source_id,
            "envs": saved.envs,
            "created": saved.created_at.timestamp(),
            "policy": policy_json(saved.policy),
            "public": saved.public_traffic,
            "mask": saved.mask_request_host,
            "carried": carried_json(saved.carried),
            "secrets": list(saved.secret_names),  # names only: never a value, nor a header rule
        }
        self.db.put_snapshot(saved.id, saved.tenant, saved.path, record)

    def drop_snapshot(self, saved: Saved) -> None:
        self.db.drop_snapshot(saved.id)

    def snapshots(self) -> list[Saved]:
        return [
            Saved(
                id=raw,
                name=r["name"],
                tenant=tenant,
                template=r["template"],
                source_id=r["source_id"],
                path=path,
                envs=dict(r["envs"]),
                created_at=datetime.datetime.fromtimestamp(r["created"], datetime.UTC),
                policy=policy_of(r["policy"]),
                public_traffic=bool(r["public"]),
                mask_request_host=r.get("mask"),
                carried=None if r["carried"] is None else carried_of(r["carried"], self.limits),
                secret_names=tuple(r.get("secrets", ())),
            )
            for raw, tenant, path, r in self.db.snapshots()
        ]


@contextlib.contextmanager
def _recording(entry: Entry, what: str) -> Iterator[None]:
    """A write the operation depends on: if the state dir cannot take it (a full disk, say), the
    operation fails with HTTP 507 and is undone by its caller."""
    try:
        yield
    except sqlite3.Error as exc:
        log.error("recording the %s of sandbox %s failed: %s", what, entry.id, exc)
        raise ApiError(507, f"cannot {what} sandbox {entry.id!r}: the state dir cannot record it "
                       f"({exc})", hint="free space in the server's --state-dir") from None  # fmt: skip


def carried_json(carried: Carried | None) -> dict[str, Any] | None:
    """The processes a save holds (:class:`~capsa.server.carry.Carried`) as JSON; the command
    table's limits are the server's (not stored: a restart may change them)."""
    if carried is None:
        return None
    return {
        "commands": {str(pid): [config, tag] for pid, (config, tag) in carried.commands.items()},
        "interpreter": carried.interpreter,
        "busy": carried.busy,
        "envs": carried.envs,
        "contexts": carried.contexts,
    }


def carried_of(data: dict[str, Any], limits: Limits) -> Carried:
    commands = {int(pid): (config, tag) for pid, (config, tag) in data["commands"].items()}
    return Carried(commands, limits, data["interpreter"], data["busy"], data["envs"], data["contexts"])


def policy_json(policy: NetworkPolicy | None) -> dict[str, Any] | None:
    """The server's policies (:mod:`capsa.server.network`: domains and CIDRs, allow or deny) as
    JSON."""
    if policy is None:
        return None
    rules = []
    for rule in policy.rules:
        if isinstance(rule.matcher, Domain):
            rules.append([rule.action.value, "domain", rule.matcher.pattern])
        elif isinstance(rule.matcher, Cidr):
            rules.append([rule.action.value, "cidr", rule.matcher.network])
        else:
            kind = type(rule.matcher).__name__
            raise CapsaError(f"a server policy with a {kind} rule cannot be stored")
    return {"default": policy.default.value, "rules": rules}


def policy_of(data: dict[str, Any] | None) -> NetworkPolicy | None:
    if data is None:
        return None
    make = {"domain": Domain, "cidr": Cidr}
    rules = [Rule(Action(action), make[kind](value)) for action, kind, value in data["rules"]]
    return NetworkPolicy(Action(data["default"]), rules)


def _record(entry: Entry) -> dict[str, Any]:
    carry: dict[str, Any] | None = entry.extra.get(_RESTART_CARRY)  # paused since a restart
    if carry is None:  # the processes its pause kept in the guest
        table, interpreter = entry.processes, entry.interpreter
        envs, contexts = interpreter.state() if interpreter is not None else ({}, {})
        carry = carried_json(Carried(
            commands=table.configs() if table is not None else {},
            interpreter=interpreter.pid if interpreter is not None else None,
            envs=envs,
            contexts=contexts,
        ))  # fmt: skip
    return {
        "tenant": entry.tenant,
        "template": entry.template,
        "metadata": entry.metadata,
        "envs": entry.envs,
        "started": entry.started_at.timestamp(),
        "end_at": entry.end_at.timestamp(),
        "timeout": entry.timeout,
        "memory_mb": entry.memory_mb,
        "token": entry.token,  # the envd access token (the traffic token derives from it)
        "auto_pause": entry.auto_pause,
        "auto_resume": entry.auto_resume,
        "resume_on_call": entry.resume_on_call,
        "policy": policy_json(entry.policy),
        "public": is_public(entry),
        "mask": mask_host(entry),
        "pause_memory": entry.pause_memory,
        "carry": carry,
        # the operator's secrets by name (their values come from its configuration at the
        # resume); network.rules header values are never stored (docs/secrets.md)
        "secrets": list(entry.secret_names),
        "rule_hosts": sorted({str(h) for s in entry.transforms for h in s.hosts}),
    }


def _stamp(value: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(value, datetime.UTC)


def _entry(sandbox_id: str, r: dict[str, Any], directory: Path | None) -> Entry:
    entry = Entry(
        id=sandbox_id,
        template=r["template"],
        vm=cast(capsa.Sandbox, Unloaded()),
        token=r["token"],
        metadata=dict(r["metadata"]),
        envs=dict(r["envs"]),
        started_at=_stamp(r["started"]),
        end_at=_stamp(r["end_at"]),
        memory_mb=int(r["memory_mb"]),
        policy=policy_of(r["policy"]),
        paused=directory,
        tenant=r["tenant"],
        auto_pause=bool(r["auto_pause"]),
        auto_resume=bool(r["auto_resume"]),
        timeout=int(r["timeout"]),
        resume_on_call=bool(r["resume_on_call"]),
        parked=True,
        pause_memory=bool(r.get("pause_memory", True)),
        secret_names=tuple(r.get("secrets", ())),
    )
    if r.get("rule_hosts"):
        log.warning("sandbox %s resumes without its network.rules headers (for %s): their values "
                    "are never stored", sandbox_id, ", ".join(r["rule_hosts"]))  # fmt: skip
    set_public(entry, bool(r["public"]))
    set_mask_host(entry, r.get("mask"))
    if directory is not None and is_files_snapshot(directory):
        entry.paused_memory = False  # its resume boots afresh: no process to take up
    elif r.get("carry"):
        entry.extra[_RESTART_CARRY] = r["carry"]
    return entry


class Unloaded:
    """The VM of a sandbox loaded paused from the state dir: there is none until its resume
    builds one. It answers what the server asks of a paused sandbox's VM: its status (stopped),
    its kill (nothing to do), its network log (none)."""

    status = RunState.STOPPED
    lifetime_expired = False
    node_id = None

    @property
    def network(self) -> Any:
        raise CapsaError("the sandbox is paused: it has no network stack")

    async def kill(self) -> None:
        return None
