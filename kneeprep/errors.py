"""The error hierarchy: everything kneeprep raises on purpose derives from :class:`KneeprepError`.

Each error also inherits the builtin that fits, so callers who do not know kneeprep can still catch it
(a missing input is a ``FileNotFoundError``, a bad recipe value a ``ValueError``). Messages name the file,
series or key and say what was expected and what was found.

Per-series failures inside a run are never raised out of the worker pool: the pipeline catches a
``KneeprepError`` per series and records ``(volume_id, kind, message)`` in the run report. ``kind`` is the
class's ``kind`` attribute, a short stable string used for counting failures by reason.
"""

from __future__ import annotations


class KneeprepError(Exception):
    """Base of every error kneeprep raises on purpose."""

    kind = "error"


class RecipeError(KneeprepError, ValueError):
    """A recipe key is unknown, missing or has a bad value. The message names the key; ``problems`` lists
    every problem found (one line each; the message joins them)."""

    kind = "recipe"

    def __init__(self, *problems: str):
        self.problems = [str(m) for m in problems] or ["bad recipe"]
        super().__init__("\n".join(self.problems))


class InputNotFoundError(KneeprepError, FileNotFoundError):
    """An input path (raw tree, mask, annotation file, store) does not exist."""

    kind = "not_found"


class DicomError(KneeprepError, ValueError):
    """A DICOM file cannot be used: unreadable, truncated, no pixel data, missing geometry."""

    kind = "dicom"


class UnsupportedSeriesError(KneeprepError, ValueError):
    """The series is of a kind kneeprep does not convert (mosaic, enhanced multi-frame, single file, ...)."""

    kind = "unsupported"


class GeometryError(KneeprepError, ValueError):
    """The slices of a series do not form one regular 3D grid (gap, duplicate, tilt, size mismatch)."""

    kind = "geometry"


class MaskError(KneeprepError, ValueError):
    """A segmentation mask cannot be placed on its volume (no overlap in world space, unreadable, bad labels)."""

    kind = "mask"


class AnnotationError(KneeprepError, ValueError):
    """An annotation record is malformed (bad CSV row, answer JSON that does not parse, unknown question)."""

    kind = "annotation"


class StoreError(KneeprepError, OSError):
    """Reading or writing the Zarr volume store or the shards failed; names the path."""

    kind = "store"


class ValidationError(KneeprepError, ValueError):
    """Shards or a store do not match their manifest, schema or declared shapes."""

    kind = "validation"
