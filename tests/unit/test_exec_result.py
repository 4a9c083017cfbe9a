"""``ExecResult.check()``: a non-zero exit becomes an ExecFailedError with the command's data."""

from __future__ import annotations

import pytest

import capsa
from capsa.agent.types import ExecResult


def test_check_returns_a_successful_result() -> None:
    result = ExecResult(("true",), 0, b"out", b"")
    assert result.check() is result


def test_check_raises_with_argv_exit_code_and_output() -> None:
    result = ExecResult(("sh", "-c", "exit 3"), 3, b"partial\n", b"boom \xff\n")
    with pytest.raises(capsa.ExecFailedError) as info:
        result.check()
    error = info.value
    assert isinstance(error, capsa.CapsaError)
    assert error.argv == ["sh", "-c", "exit 3"]
    assert error.exit_code == 3
    assert (error.stdout, error.stderr) == ("partial\n", "boom \ufffd\n")
    assert "exited with 3" in str(error) and "boom" in str(error)


def test_errors_defined_elsewhere_are_the_ones_in_errors() -> None:
    """The public errors once defined in their modules are capsa.errors' (old names still import)."""
    from capsa import errors
    from capsa.agent.connections import ConnectionRefused
    from capsa.ray._host import NoSlotError
    from capsa.recipes.capture import CaptureError
    from capsa.recipes.run import StepError

    assert ConnectionRefused is errors.ConnectionRefused
    assert NoSlotError is errors.NoSlotError
    assert (CaptureError, StepError) == (errors.CaptureError, errors.StepError)
    assert set(errors.__all__) >= {"ExecFailedError", "StepError", "CaptureError", "NoSlotError"}
