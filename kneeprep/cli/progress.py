"""Progress bars on stderr for the stages' ``progress(task, done, total, item)`` calls (click draws them)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

#: what each task counts, shown after the bar
UNITS = {"scan": "files", "convert": "series", "boxes": "volumes", "shards": "shards", "validate": "shards",
         "export": "volumes", "writing series": "series"}  # fmt: skip


class Bars:
    """A ``progress`` callable: one click progress bar per task, opened at the task's first call (when its
    total is known) and closed when the task is done, another task starts, or the bars are closed."""

    def __init__(self) -> None:
        self.task: str | None = None
        self.bar = None

    def __call__(self, task: str, done: int, total: int, item: str = "") -> None:
        if task != self.task:
            self.close()
            self.task = task
            unit = UNITS.get(task, "")
            self.bar = click.progressbar(
                length=total, label=task, file=sys.stderr, show_pos=True,
                item_show_func=lambda name: name or unit,
            )  # fmt: skip
            self.bar.__enter__()
        self.bar.length = max(total, 1)
        self.bar.update(done - self.bar.pos, item or None)
        if done >= total:
            self.close()  # a finished task's bar ends its line before the stage prints its summary

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.bar, self.task = None, None


@contextlib.contextmanager
def bars(enabled: bool = True) -> Iterator[Bars | None]:
    """``with bars(progress) as p: stage(..., progress=p)`` -- ``None`` when disabled (``--no-progress``)."""
    if not enabled:
        yield None
        return
    b = Bars()
    try:
        yield b
    finally:
        b.close()
