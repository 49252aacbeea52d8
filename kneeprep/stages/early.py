"""Convert's tasks and its early starts: the record a worker gets for one series (:class:`ConvertTask`), and
the series converted while the scan still runs (:class:`EarlyStarts`), reconciled with the finished scan."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kneeprep.formats import store as vstore
from kneeprep.formats.report import ItemResult, RunReport


@dataclass(frozen=True)
class ConvertTask:
    """What the driver sends to a worker for one series: paths and small records only."""

    info: object  # kneeprep.dicom.SeriesInfo
    mask_path: str | None
    #: the scan's record of the series (:func:`kneeprep.stages.resume.series_key`; no stat)
    key: str
    #: hash the input bytes of a volume whose fingerprint is unchanged (``--verify``)
    verify: bool = False
    #: convert even when the stored volume looks unchanged (an early task's redo)
    force: bool = False


def previously_revised(store: Path) -> dict[str, str]:
    """``context.revised`` of the store's last convert report: provisional series (volume id -> series key,
    :func:`kneeprep.stages.resume.series_key`) that the finished scan contradicted."""
    try:
        revised = json.loads(vstore.report_path(store).read_text()).get("context", {}).get("revised") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in revised.items()} if isinstance(revised, dict) else {}


class EarlyStarts:
    """Series converted while the scan still runs, and what the finished scan says of them.

    The scan hands out *provisional* series (:func:`kneeprep.dicom.scan_tree`'s ``on_series``, once the folder
    holding one has been read); :meth:`start` plans each and submits its task at once. The finished scan is
    authoritative (:meth:`reconcile`): an early task stands when the final series equals the provisional one;
    otherwise its result is dropped when it returns and a redo follows -- or, when the series no longer exists
    or is no longer to be converted, what the early task wrote is deleted (:meth:`results`). ``revised`` (volume
    id -> series key) lists the contradicted early tasks; the next run does not start them early again
    (``held_back``).
    """

    def __init__(self, plan, stream, held_back: dict[str, str]):
        self.plan, self.stream, self.held_back = plan, stream, held_back
        #: volume id -> (provisional series, the plan made for it)
        self.provisional: dict[str, tuple[object, ConvertTask | ItemResult]] = {}
        #: ids submitted before the scan finished
        self.submitted: set[str] = set()
        #: early tasks the finished scan contradicts -> their series key
        self.revised: dict[str, str] = {}
        #: volume id -> its redo once the early task has returned (None: delete what that task wrote)
        self.after: dict[str, ConvertTask | None] = {}

    def start(self, info) -> None:
        decision = self.plan(info)
        self.provisional[info.volume_id] = (info, decision)
        if isinstance(decision, ConvertTask) and self.held_back.get(info.volume_id) != decision.key:
            self.stream.submit(decision)
            self.submitted.add(info.volume_id)

    def reconcile(self, final: dict[str, object], report: RunReport) -> int:
        """Plan every series of the finished scan (``final``: volume id -> series) against what started early,
        submit what is left, add the skipped/failed records to ``report``; returns how many results to await."""
        early = self.submitted
        self.revised.update(
            (v, d.key)
            for v, (i, d) in self.provisional.items()
            if isinstance(d, ConvertTask) and final.get(v) != i
        )
        n_tasks = len(early)
        for vid, info in final.items():
            if vid in early and vid not in self.revised:
                continue  # submitted early, and right
            seen, decision = self.provisional.get(vid, (None, None))
            if seen != info or vid in early:  # not planned while scanning, or planned for another series
                decision = self.plan(info, redo=vid in early)
            if vid in early:
                self.after[vid] = decision if isinstance(decision, ConvertTask) else None
            if isinstance(decision, ConvertTask):
                if vid not in early:
                    self.stream.submit(decision)
                    n_tasks += 1
            else:
                report.add(decision)
                n_tasks -= vid in early
        for vid in early - final.keys():
            self.after[vid] = None
            n_tasks -= 1
        return n_tasks

    def results(self, results: Iterable[ItemResult], store: Path) -> Iterator[ItemResult]:
        """The results to report: an early task's result that the scan overruled is dropped, then its redo is
        submitted or its volume deleted."""
        for r in results:
            if r.item in self.after:
                redo = self.after.pop(r.item)
                if redo is not None:
                    self.stream.submit(redo)
                elif r.status == "written":
                    vstore.delete_volume(store, r.item)
                continue
            yield r

    def stands(self, r: ItemResult) -> bool:
        """Whether a result taken after an interrupt counts (not an overruled early task's)."""
        return r.item not in self.after and r.item not in self.revised
