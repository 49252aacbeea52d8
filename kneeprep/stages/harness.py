"""The stage harness: what every stage that writes an output does, written once.

A stage run is a :class:`Stage` used as a context manager over its output folder::

    with Stage("export", out, what="export", context={...}, progress=progress, workers=2) as st:
        for r in st.track(st.executor().map_unordered(fn, todo), len(todo), "export"):
            st.report.add(r)
        st.finish()          # writes <out>/report.json

It owns, for every stage:

- **the output lock** (:func:`kneeprep.files.lock`): a second run into the same folder stops before any work;
- **clean-up of partial files** a killed run left (temporary names of :func:`kneeprep.files.atomic_path`,
  matched by the stage's ``partials`` globs), done under the lock, listed in ``stage.cleaned``;
- **the run report** (:class:`~kneeprep.formats.report.RunReport`, ``stage.report``), written by
  :meth:`Stage.finish`, and on Ctrl-C: ``context.interrupted`` set, the stage's interrupt hooks run
  (:meth:`Stage.on_interrupt`, e.g. results that finished but were not yet taken), the report written, the
  ``KeyboardInterrupt`` re-raised;
- **the executor** (:func:`kneeprep.parallel.executor`), started on first use and closed with the stage;
- **progress**: ``progress(task, done, total, item="")`` calls (:class:`kneeprep.formats.report.Progress`),
  a plain callable that knows nothing of any UI (the CLI draws bars: :mod:`kneeprep.cli.progress`); ``None``
  is silent.

Stages whose report has its own format (the shards stage's ``report.json``) pass ``report_name=None`` and
write it themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kneeprep import files
from kneeprep.formats.report import Progress, RunReport, ticker


class Stage(contextlib.AbstractContextManager):
    """One run of one stage over one output folder (see the module docstring)."""

    def __init__(
        self,
        command: str,
        out: str | Path,
        *,
        what: str = "store",
        lock_name: str = files.LOCK_FILE,
        partials: Iterable[str] = ("*",),
        report_name: str | None = "report.json",
        context: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        workers: int | None = None,
        scheduler: str | None = None,
        lock: bool = True,
        executor=None,
    ):
        self.command, self.out = command, Path(out)
        self.what, self.lock_name, self.partials = what, lock_name, tuple(partials)
        self.report_name, self.progress = report_name, (progress or None)
        self.workers, self.scheduler, self._lock = workers, scheduler, lock
        self.report = RunReport(command, dict(context or {}))
        self.cleaned: list[str] = []
        self._hooks: list[Callable[[], None]] = []
        self._stack = contextlib.ExitStack()
        #: an executor the caller owns (``rebuild`` runs every stage on one cluster), else started on demand
        self._executor = executor

    def __enter__(self) -> Stage:
        if self._lock:
            self._stack.enter_context(files.lock(self.out, self.what, self.lock_name))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        for pattern in self.partials:
            self.cleaned += [
                p.relative_to(self.out).as_posix() for p in files.remove_partials(self.out, pattern)
            ]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                self.report.context["interrupted"] = True
                for hook in self._hooks:
                    hook()
                if self.report_name is not None:
                    self.finish()
        finally:
            self._stack.close()  # the executor first (entered last), then the lock
        return False

    # -- the executor ------------------------------------------------------------------------------------

    def executor(self):
        """The stage's executor: the one given to the stage (its owner closes it), else
        :func:`kneeprep.parallel.executor` with the stage's workers/scheduler, started on the first call in
        the background and closed when the stage ends."""
        if self._executor is None:
            from kneeprep.parallel import executor  # distributed is imported only by stages that need it

            self._executor = self._stack.enter_context(executor(self.workers, self.scheduler))
        return self._executor

    # -- progress ----------------------------------------------------------------------------------------

    def tick(self, task: str, done: int, total: int, item: str = "") -> None:
        if self.progress is not None:
            self.progress(task, done, total, item)

    def ticker(self, task: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback for ``task`` (for functions that take one), or None when silent."""
        return ticker(self.progress, task)

    def track(
        self, results: Iterable[Any], total: int, task: str, item=lambda r: getattr(r, "item", "")
    ) -> Iterator:
        """Yield ``results``, ticking ``task`` after each (``item(r)`` names it)."""
        done = 0
        for r in results:
            done += 1
            self.tick(task, done, total, item(r) if item else "")
            yield r

    # -- the report --------------------------------------------------------------------------------------

    def on_interrupt(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on Ctrl-C, before the report is written (e.g. to add results already finished)."""
        self._hooks.append(hook)

    def finish(self) -> RunReport:
        """Stamp the report's end time and write it to ``<out>/<report_name>``; returns it."""
        self.report.finish()
        if self.report_name is not None:
            self.report.write(self.out / self.report_name)
        return self.report


@contextlib.contextmanager
def settled_heap() -> Iterator[Callable[[], None]]:
    """A ``settle()`` to call between the stages of a long run: what the run holds by then (imports, the scan's
    records, the volumes' attrs) moves out of the cyclic garbage collector's sight (:func:`gc.freeze`), so its
    full collections, which come more often as the run allocates, stop walking it again and again; refcounts
    still free what is dropped. Undone on leaving (:func:`gc.unfreeze`). A process that froze objects itself
    (``gc.get_freeze_count()`` already set, e.g. before forking) is left alone: ``settle`` does nothing."""
    import gc

    if gc.get_freeze_count():
        yield lambda: None
        return
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()
