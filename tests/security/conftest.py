"""The attack suite: every test here performs one attack a hostile guest (or a hostile caller) could
try, and checks that it fails. Tests that boot guests get the same leak check as the integration tests."""

from __future__ import annotations

from tests.integration.conftest import no_leaks

__all__ = ["no_leaks"]
