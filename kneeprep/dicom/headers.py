"""Reading one DICOM file's header into a small :class:`SliceHeader` record, without decoding pixels.

The PixelData (7FE0,0010) element is *deferred*: pydicom records where its value starts and how long it
claims to be, and seeks past it. That is enough to tell, from the header alone, whether the file is
truncated (the value runs past the end of the file) or its pixel data is shorter than Rows x Columns x
SamplesPerPixel x BitsAllocated/8 x NumberOfFrames.

:func:`read_header` checks the file, then parses plain Little Endian files directly
(:mod:`kneeprep.dicom.plain_le`) and everything else with pydicom (:mod:`kneeprep.dicom.header_pydicom`); the
record and the checks both paths share are in :mod:`kneeprep.dicom.slice_header`.
"""

from __future__ import annotations

import os
from pathlib import Path

from kneeprep.dicom.header_pydicom import header_from_dataset
from kneeprep.dicom.plain_le import _fast_header
from kneeprep.dicom.slice_header import NotDicomError, SliceHeader, looks_like_dicom
from kneeprep.errors import DicomError


def read_header(path: str | Path, *, fast: bool = True) -> SliceHeader:
    """Read the header of ``path`` (pixel data deferred, never decoded).

    Plain Part 10 files in Explicit or Implicit VR Little Endian are parsed directly (about 5x faster than
    pydicom; ``fast=False`` turns that off); anything else, and any file the fast path finds unusual, is read by
    pydicom, which also words every error.

    Raises :class:`NotDicomError` for a file that is not DICOM and :class:`~kneeprep.errors.DicomError`
    naming the file and the reason for an empty, unreadable or malformed one.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise DicomError(f"{p}: cannot open: {e.strerror or e}") from None
    if size == 0:
        raise DicomError(f"{p}: empty file (0 bytes)")
    if not looks_like_dicom(head):
        raise NotDicomError(f"{p}: not DICOM (no 'DICM' prefix at byte 128, no plausible first element)")
    if fast and (header := _fast_header(p, size)) is not None:
        return header
    try:
        ds = pydicom.dcmread(p, defer_size=1024, force=head[128:132] != b"DICM")
    except InvalidDicomError as e:
        raise DicomError(f"{p}: not a readable DICOM file: {e}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError) as e:
        raise DicomError(
            f"{p}: header cannot be parsed (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None
    try:
        return header_from_dataset(p, ds, size)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DicomError(f"{p}: bad header value: {type(e).__name__}: {e}") from None
