"""Per-step progress of image builds on the terminal (rich), with the failing step's output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from capsa.errors import ImageError

OUTPUT_LINES = 40  # of a failing step's output


class Steps:
    """A ``progress(step)`` callback: each call finishes the previous step and starts the next."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self._progress = progress
        self._console = console
        self._task: TaskID | None = None
        self.current = ""

    def __call__(self, step: str) -> None:
        subject = step.rpartition(": ")[0]
        if self._task is not None and subject and subject == self.current.rpartition(": ")[0]:
            self.current = step  # "base: building" then "base: built in 2.0s": one line
            self._finish("")
            return
        self._finish("[green]done[/]")
        self.current = step
        self._task = self._progress.add_task(escape(step), total=None)

    def _finish(self, state: str) -> None:
        if self._task is None:
            return
        text = f"{escape(self.current)}  {state}" if state else escape(self.current)
        self._progress.update(self._task, description=text, total=1, completed=1)
        self._task = None

    def done(self) -> None:
        self._finish("[green]done[/]")

    def failed(self, exc: BaseException) -> None:
        self._finish("[red]failed[/]")
        output = getattr(exc, "output", None)
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        if isinstance(output, str) and output.strip() and output.strip() not in str(exc):
            lines = output.rstrip().splitlines()[-OUTPUT_LINES:]
            title = f"output of the failed step {self.current!r}" if self.current else "output"
            self._console.rule(title, style="red")
            self._console.print("\n".join(lines), markup=False, highlight=False)
            self._console.rule(style="red")


@contextmanager
def build_steps(console: Console | None = None) -> Iterator[Steps]:
    """Show each step of a build; on :class:`ImageError`, mark the step failed and show its output."""
    console = console or Console(stderr=True)
    columns = (SpinnerColumn(finished_text="-"), TextColumn("{task.description}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:
        steps = Steps(progress, console)
        try:
            yield steps
        except ImageError as exc:
            steps.failed(exc)
            raise
        steps.done()
