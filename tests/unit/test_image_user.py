"""Docker's ``User`` forms resolved from an image's own /etc/passwd and /etc/group (no VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsa.agent.guest import accounts
from capsa.agent.guest.sessions import error_body
from capsa.agent.guest.userroot import Identity, resolve_user


@pytest.fixture
def root(tmp_path: Path) -> str:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "# comment\nroot:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nbad:x:zz:0::/:\n"
    )
    (tmp_path / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:app\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("root", Identity(0, 0, "/root")),
        ("app", Identity(1000, 1001, "/home/app")),
        ("app:staff", Identity(1000, 50, "/home/app")),
        ("app:7", Identity(1000, 7, "/home/app")),
        ("1000", Identity(1000, 1001, "/home/app")),
        ("4242", Identity(4242, 0, None)),  # unknown uid: Docker's gid 0
        ("4242:4243", Identity(4242, 4243, None)),
    ],
)
def test_user_forms(root: str, spec: str, expected: Identity) -> None:
    assert resolve_user(spec, root) == expected


@pytest.mark.parametrize("spec", ["nobody", "app:nogroup", "bad", "99999999999"])
def test_unknown_or_invalid_users_are_refused(root: str, spec: str) -> None:
    with pytest.raises(ValueError):
        resolve_user(spec, root)


def test_image_without_passwd(tmp_path: Path) -> None:
    assert resolve_user("0", str(tmp_path)) == Identity(0, 0, None)
    with pytest.raises(ValueError):
        resolve_user("app", str(tmp_path))


def test_accounts_carry_their_groups_and_name(root: str) -> None:
    """A request's account: initgroups' groups (its gid, then the groups listing it), its name
    also when given as a uid; an unknown one is the agent's ``unknown_user`` error."""
    assert accounts.resolve("app", root) == accounts.Account(1000, 1001, (1001, 50), "app", "/home/app")
    assert accounts.resolve("1000", root).name == "app"
    assert accounts.resolve("4242", root) == accounts.Account(4242, 0, (0,), None, None)
    assert accounts.resolve("root", root).is_root
    with pytest.raises(accounts.UnknownUser) as info:
        accounts.resolve("nobody", root)
    assert error_body(info.value)["kind"] == "unknown_user"


def test_make_directories_hands_over_only_what_it_creates(tmp_path: Path) -> None:
    me = accounts.Account(os.getuid(), os.getgid(), (os.getgid(),), "me", None)
    accounts.make_directories(str(tmp_path / "a" / "b"), 0o755, me)
    assert (tmp_path / "a" / "b").is_dir()
    accounts.make_directories(str(tmp_path / "a" / "b"), 0o755, me)  # exists: no error
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        accounts.make_directories(str(tmp_path / "file"), 0o755, me)
    with pytest.raises(NotADirectoryError):
        accounts.make_directories(str(tmp_path / "file" / "sub"), 0o755, me)
