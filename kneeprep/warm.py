"""Imported by each local Dask worker process when it starts (``distributed.worker.preload``).

A worker's first task would otherwise pay for importing zarr, pydicom, SimpleITK and kneeprep's own modules
(about 0.3-0.5 s, measured); the local cluster starts while the main process scans the raw tree
(:func:`kneeprep.parallel.executor`), so this cost overlaps the scan instead of delaying the first series.
Besides imports, one thing, only in the workers of the local cluster ``kneeprep`` starts (they get
``KNEEPREP_LOCAL_WORKER=1``): they ignore SIGINT. Ctrl-C in a terminal reaches the whole process group (where
the cluster runs in the driver's process: :mod:`kneeprep.parallel_procs` gives it a session of its own); the
main process handles it (reports, cancels, closes the cluster, which stops its workers), so a worker printing
its own ``KeyboardInterrupt`` traceback would only bury the message that matters. A worker you start yourself
with ``--preload kneeprep.warm`` keeps its Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import numcodecs.blosc  # noqa: F401
import pydicom.filereader  # noqa: F401
import SimpleITK as sitk
import zarr  # noqa: F401

from kneeprep import boxes, dicom, transforms  # noqa: F401
from kneeprep.formats import masks, store  # noqa: F401
from kneeprep.parallel import LOCAL_WORKER_ENV
from kneeprep.stages import convert  # noqa: F401

# SimpleITK loads its compiled module on first attribute use
sitk.Image  # noqa: B018

if os.environ.get(LOCAL_WORKER_ENV) == "1" and threading.current_thread() is threading.main_thread():
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
