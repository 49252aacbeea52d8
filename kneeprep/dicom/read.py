"""``read_series``: the pixels of a scanned series, in position order, with their geometry.

Fast path (measured, see ``read_series``): for native transfer syntaxes (Implicit/Explicit VR Little
Endian, Explicit VR Big Endian, Deflated) each file is parsed once by pydicom and its PixelData bytes are
viewed with ``np.frombuffer`` -- no copy beyond the output array. Encapsulated syntaxes are decoded per file:
RLE Lossless by pydicom itself, the JPEG family (baseline, lossless, JPEG-LS, JPEG 2000) by SimpleITK/GDCM,
which kneeprep already depends on (pydicom would need ``pylibjpeg`` plugins that kneeprep does not ship).

The pixel steps are pure functions of (array, header values) that cite their tags:
:func:`stored_values` (BitsStored/PixelRepresentation), :func:`rescale_dtype` and :func:`apply_rescale`
(RescaleSlope/RescaleIntercept).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kneeprep.dicom.input_bytes import read_input
from kneeprep.dicom.series import SeriesInfo
from kneeprep.dicom.slice_header import NATIVE_SYNTAXES, PIXEL_DATA
from kneeprep.errors import DicomError, GeometryError, UnsupportedSeriesError
from kneeprep.geometry import Geometry

RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def stored_values(raw: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep the low ``bits_stored`` bits of each value -- BitsStored (0028,0101) -- and sign-extend them
    when PixelRepresentation (0028,0103) is 1. Returns an array of ``raw``'s dtype (a new one only when
    bits had to be masked or extended).

    >>> stored_values(np.array([0x0FFF, 0x0800, 0xF001], dtype=np.uint16).view(np.int16), 12, True).tolist()
    [-1, -2048, 1]
    >>> stored_values(np.array([0xF001], dtype=np.uint16), 12, False).tolist()
    [1]
    """
    bits = raw.dtype.itemsize * 8
    if not 0 < bits_stored < bits:
        return raw
    if signed:
        shift = bits - bits_stored
        return (raw << shift) >> shift  # arithmetic shift on a signed dtype sign-extends
    return raw & np.array((1 << bits_stored) - 1, dtype=raw.dtype)


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The range of stored values BitsStored (0028,0101) bits can hold.

    >>> stored_range(12, False), stored_range(16, True)
    ((0, 4095), (-32768, 32767))
    """
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def rescale_dtype(
    stored_dtype: np.dtype,
    bits_stored: int,
    signed: bool,
    slopes: Sequence[float],
    intercepts: Sequence[float],
) -> np.dtype:
    """The output dtype of :func:`apply_rescale` for a whole series.

    With RescaleSlope (0028,1053) 1 and RescaleIntercept (0028,1052) 0 everywhere, the stored dtype is kept.
    When every slope and intercept is an integer, the result is integral: the stored dtype is kept if the
    rescaled range of *every possible stored value* (from BitsStored, so the choice does not depend on the
    data) fits it, else the first of int16, uint16, int32, int64 that holds it. Otherwise float32 (exact for MR/CT magnitudes, far below 2**24; values
    with a fractional slope are rounded to float32 precision).

    >>> rescale_dtype(np.dtype(np.uint16), 12, False, [1.0], [-1024.0])
    dtype('int16')
    >>> rescale_dtype(np.dtype(np.int16), 16, True, [1.0, 1.0], [0.0, 0.0])
    dtype('int16')
    >>> rescale_dtype(np.dtype(np.uint16), 12, False, [0.5], [0.0])
    dtype('float32')
    """
    stored_dtype = np.dtype(stored_dtype)
    if all(s == 1 for s in slopes) and all(i == 0 for i in intercepts):
        return stored_dtype
    if not all(
        float(s).is_integer() and float(i).is_integer() for s, i in zip(slopes, intercepts, strict=True)
    ):
        return np.dtype(np.float32)
    lo, hi = stored_range(bits_stored, signed)
    ends = [s * v + i for s, i in zip(slopes, intercepts, strict=True) for v in (lo, hi)]
    lo_out, hi_out = min(ends), max(ends)
    for cand in (
        stored_dtype,
        np.dtype(np.int16),
        np.dtype(np.uint16),
        np.dtype(np.int32),
        np.dtype(np.int64),
    ):
        if cand.kind in "iu" and np.iinfo(cand).min <= lo_out and hi_out <= np.iinfo(cand).max:
            return cand
    return np.dtype(np.float64)


def apply_rescale(stored: np.ndarray, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    """Modality values ``stored * RescaleSlope (0028,1053) + RescaleIntercept (0028,1052)`` as ``dtype``
    (from :func:`rescale_dtype`). Integer outputs are computed in int64 and are exact; float outputs in
    float64, then cast.

    >>> apply_rescale(np.array([0, 2000], dtype=np.uint16), 1.0, -1024.0, np.dtype(np.int16)).tolist()
    [-1024, 976]
    """
    dtype = np.dtype(dtype)
    if slope == 1 and intercept == 0:
        return stored.astype(dtype, copy=False)
    if dtype.kind in "iu":
        return (stored.astype(np.int64) * int(slope) + int(intercept)).astype(dtype)
    return (stored.astype(np.float64) * float(slope) + float(intercept)).astype(dtype)


def _native_dtype(bits_allocated: int, signed: bool, byte_order: str, path: Path) -> np.dtype:
    if bits_allocated not in (8, 16, 32):
        raise UnsupportedSeriesError(f"{path}: BitsAllocated (0028,0100) {bits_allocated} is not 8, 16 or 32")
    return np.dtype(f"{byte_order}{'i' if signed else 'u'}{bits_allocated // 8}")


class _Slice:
    """One decoded file: stored values (or already-rescaled values when GDCM decoded them)."""

    __slots__ = ("values", "slope", "intercept", "rescaled", "header", "ipp")

    def __init__(self, values, slope, intercept, rescaled, header, ipp=None):
        self.values, self.slope, self.intercept, self.rescaled, self.header = (
            values,
            slope,
            intercept,
            rescaled,
            header,
        )
        self.ipp = ipp


def _read_slice_fast(path: Path, data: bytes) -> _Slice | None:
    """The slice in ``data`` (the whole file) when it is a plain single-frame Little Endian file with native
    pixels, decoded without pydicom; ``None`` for anything else (pydicom then reads it and words any error).
    Gives exactly what the pydicom path gives (tested on the same files)."""
    from kneeprep.dicom.plain_le import _UNDEFINED, _parse_fast, _Unusual, _Values

    try:
        ts, raw, tell, length = _parse_fast(data, len(data))
        if tell is None or length == _UNDEFINED:
            return None
        v = _Values(raw)
        rows, cols = v.us(0x00280010, 0), v.us(0x00280011, 0)
        spp, frames = v.us(0x00280002, 1), int(v.integer(0x00280008) or 1)
        bits_alloc = v.us(0x00280100, 0)
        bits_stored = v.us(0x00280101, bits_alloc)
        signed = v.us(0x00280103, 0) == 1
        slope = v.number(0x00281053, 1.0) or 1.0  # as the pydicom path: a 0 slope counts as absent
        intercept = v.number(0x00281052, 0.0)
        ipp = v.floats(0x00200032, 3)
    except (_Unusual, ValueError, UnicodeDecodeError):
        return None
    if rows == 0 or cols == 0 or spp != 1 or frames != 1 or bits_alloc not in (8, 16, 32):
        return None
    dtype = _native_dtype(bits_alloc, signed, "<", path)
    if length < rows * cols * dtype.itemsize or tell + rows * cols * dtype.itemsize > len(data):
        return None
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols, offset=tell).reshape(rows, cols)
    header = (rows, cols, bits_alloc, bits_stored, signed)
    s = _Slice(stored_values(pixels.astype(dtype.newbyteorder("="), copy=False), bits_stored, signed),
               slope, intercept, False, header)  # fmt: skip
    s.ipp = ipp
    return s


def _read_slice(path: Path, data: bytes | None = None) -> _Slice:
    """One slice's stored values, rescale and header; ``data`` is the file's bytes when already read."""
    if data is not None and (fast := _read_slice_fast(path, data)) is not None:
        return fast
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise DicomError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = (
            "1.2.840.10008.1.2"
            if ds.is_implicit_VR
            else ("1.2.840.10008.1.2.1" if ds.is_little_endian else "1.2.840.10008.1.2.2")
        )
    if PIXEL_DATA not in ds:
        raise DicomError(f"{path}: no pixel data (PixelData (7FE0,0010) absent)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if spp != 1 or frames != 1:
        raise UnsupportedSeriesError(
            f"{path}: SamplesPerPixel {spp}, NumberOfFrames {frames}: expected 1 and 1"
        )
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    header = (rows, cols, bits_alloc, bits_stored, signed)
    ipp = ds.get("ImagePositionPatient")
    ipp = tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None
    s = _decode_pixels(path, ds, ts, header, slope, intercept)
    s.ipp = ipp
    return s


def _decode_pixels(path: Path, ds, ts: str, header, slope: float, intercept: float) -> _Slice:
    rows, cols, bits_alloc, bits_stored, signed = header
    if ts in NATIVE_SYNTAXES:
        dtype = _native_dtype(bits_alloc, signed, NATIVE_SYNTAXES[ts], path)
        buf = ds.PixelData
        need = rows * cols * dtype.itemsize
        if len(buf) < need:
            raise DicomError(
                f"{path}: pixel data has {len(buf)} bytes, Rows x Columns x BitsAllocated/8 = {need}"
            )
        raw = np.frombuffer(buf, dtype=dtype, count=rows * cols).reshape(rows, cols)
        return _Slice(
            stored_values(raw.astype(dtype.newbyteorder("="), copy=False), bits_stored, signed),
            slope,
            intercept,
            False,
            header,
        )
    if ts == RLE_LOSSLESS:
        try:
            arr = ds.pixel_array
        except Exception as e:
            raise DicomError(f"{path}: RLE pixel data cannot be decoded: {e}") from None
        return _Slice(stored_values(np.asarray(arr), bits_stored, signed), slope, intercept, False, header)
    return _read_slice_gdcm(path, slope, intercept, header)


def _read_slice_gdcm(path: Path, slope: float, intercept: float, header) -> _Slice:
    """Decode an encapsulated (JPEG-family) file with SimpleITK's GDCM reader.

    GDCM applies RescaleSlope/RescaleIntercept itself, so the values are modality values (``rescaled``).
    """
    import SimpleITK as sitk

    rows, cols = header[0], header[1]
    try:
        r = sitk.ImageFileReader()
        r.SetImageIO("GDCMImageIO")
        r.SetFileName(str(path))
        arr = sitk.GetArrayFromImage(r.Execute())
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise DicomError(f"{path}: compressed pixel data cannot be decoded by GDCM: {msg}") from None
    arr = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim == 3 else arr
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (rows, cols):
        raise DicomError(f"{path}: GDCM decoded shape {arr.shape}, header says Rows x Columns {rows}x{cols}")
    return _Slice(arr, slope, intercept, True, header)


def read_slices(paths: Sequence[str | Path]) -> np.ndarray:
    """Modality values of single-frame files, stacked in the given order along axis 0.

    RescaleSlope (0028,1053) / RescaleIntercept (0028,1052) are applied per file; the dtype is chosen once for
    all files by :func:`rescale_dtype` (integers stay integers when the result is integral and fits).
    Raises :class:`~kneeprep.errors.DicomError` naming the file for unreadable or mismatched files.
    """
    return _read_stack(paths)[0]


def _read_stack(paths: Sequence[str | Path], hasher=None) -> tuple[np.ndarray, list[_Slice]]:
    """Stored values of ``paths`` stacked, and their slices. Each file is read once, whole; ``hasher`` (a
    ``hashlib`` object), if given, is updated with each file's name, a NUL and its bytes, in order."""
    if not paths:
        raise DicomError("read_slices: no files given")
    # Stored values go into one preallocated array as each file is read, so its PixelData is released at
    # once: reading holds one volume, not two. With no rescale (the usual case) that array is the result.
    slices: list[_Slice] = []
    stack = None
    for k, p in enumerate(paths):
        p = Path(p)
        data = read_input(p, hasher)
        s = _read_slice(p, data)
        del data
        if slices and s.header != slices[0].header:
            raise DicomError(
                f"{p}: (Rows, Columns, BitsAllocated, BitsStored, signed) {s.header} differ from "
                f"{slices[0].header} in {paths[0]}"
            )
        if not s.rescaled:
            if stack is None:
                stack = np.empty((len(paths), *s.header[:2]), dtype=s.values.dtype)
            if s.values.dtype == stack.dtype:
                stack[k] = s.values
                s.values = None
        slices.append(s)
    rows, cols, bits_alloc, bits_stored, signed = slices[0].header
    stored_dtype = (
        stack.dtype if stack is not None else np.dtype(f"{'i' if signed else 'u'}{max(1, bits_alloc // 8)}")
    )
    dtype = rescale_dtype(
        stored_dtype, bits_stored, signed, [s.slope for s in slices], [s.intercept for s in slices]
    )
    if (
        stack is not None
        and dtype == stack.dtype
        and all(s.values is None and s.slope == 1 and s.intercept == 0 for s in slices)
    ):
        return stack, slices
    out = (
        stack
        if stack is not None and dtype == stack.dtype
        else np.empty((len(slices), rows, cols), dtype=dtype)
    )
    for k, (p, s) in enumerate(zip(paths, slices, strict=True)):
        vals = stack[k] if s.values is None else s.values
        if s.rescaled:
            if dtype.kind in "iu" and not np.array_equal(vals, np.rint(vals)):
                raise DicomError(
                    f"{p}: decoded values are not integral but RescaleSlope/Intercept are integers"
                )
            out[k] = vals.astype(dtype) if dtype.kind in "iu" else vals
        else:
            out[k] = apply_rescale(vals, s.slope, s.intercept, dtype)
    return out, slices


def read_series(
    info: SeriesInfo, *, position_tolerance: float = 0.5, hasher=None
) -> tuple[np.ndarray, Geometry]:
    """The pixels of ``info`` as a ``(slices, rows, columns)`` array in position order, and its geometry.

    Values are modality values (RescaleSlope (0028,1053) and RescaleIntercept (0028,1052) applied, per file);
    the dtype is the stored one (uint16/int16 ...) when there is no rescale, the smallest integer type that
    holds every rescaled value when slope and intercept are integers, float32 otherwise (see
    :func:`rescale_dtype`). The geometry is the scan's: origin = ImagePositionPatient (0020,0032) of the first
    slice, axes from ImageOrientationPatient (0020,0037) and PixelSpacing (0028,0030), slice spacing measured
    from the positions. Each file's ImagePositionPatient is re-checked against the scan's affine: it must lie
    within ``position_tolerance`` slice spacings of where the affine puts its slice (files changed since the
    scan raise :class:`~kneeprep.errors.GeometryError`). Each file is read once; ``hasher`` (a ``hashlib``
    object), if given, takes each file's name, a NUL and its bytes in slice order as they are read (the
    convert task's content hash, without a second pass over the files).

    Enhanced multi-frame series (``info.frames``) are read by :func:`kneeprep.dicom.enhanced.read_frames`:
    the same contract, positions and rescale taken per frame from the functional groups.

    Raises :class:`~kneeprep.errors.UnsupportedSeriesError` for an unsupported verdict,
    :class:`~kneeprep.errors.GeometryError` when the slices do not form one regular grid (gap, duplicate,
    tilt, inconsistent orientation), :class:`~kneeprep.errors.DicomError` naming the file that cannot be read.
    """
    where = f"series {info.volume_id} ({info.files[0].parent if info.files else 'no files'})"
    if info.qc.status == "unsupported":
        raise UnsupportedSeriesError(f"{where}: unsupported: {info.qc.first_reason}")
    geo = info.geometry
    if geo is None:
        raise GeometryError(f"{where}: no usable geometry ({info.qc.first_reason or 'positions missing'})")
    bad = [r for r in info.qc.reasons if r.startswith(_GEOMETRY_FAILURES)]
    if bad:
        raise GeometryError(f"{where}: slices do not form one regular grid: {bad[0]}")
    if getattr(info, "frames", None) is not None:  # enhanced multi-frame: slices are frames of the files
        from kneeprep.dicom.enhanced import read_frames

        volume, ipps, labels = read_frames(info, hasher)
    else:
        volume, slices = _read_stack(info.files, hasher)
        ipps, labels = [s.ipp for s in slices], [str(p) for p in info.files]
    if volume.shape != geo.shape:
        raise GeometryError(f"{where}: read shape {volume.shape} differs from the scanned {geo.shape}")
    n = volume.shape[0]
    expected = geo.index_to_world(np.stack([np.arange(n), np.zeros(n), np.zeros(n)], axis=1))
    tol = position_tolerance * geo.spacing[0]
    for k, (label, ipp) in enumerate(zip(labels, ipps, strict=True)):
        if ipp is None or np.linalg.norm(np.subtract(ipp, expected[k])) > tol:
            raise GeometryError(
                f"{label}: ImagePositionPatient (0020,0032) {ipp} is not where the scan put slice {k} "
                f"({[round(v, 4) for v in expected[k].tolist()]}, tolerance {tol:.3g} mm): changed since the scan?"
            )
    return volume, geo


#: Reason prefixes (from :mod:`kneeprep.dicom.qc`) that mean the affine would misplace voxels.
_GEOMETRY_FAILURES = (
    "missing slices",
    "non-uniform slice spacing",
    "duplicate slice positions",
    "inconsistent orientation",
    "inconsistent pixel spacing",
    "inconsistent matrix size",
    "inconsistent FrameOfReferenceUID",
    "inconsistent pixel encoding",
    "slices are not stacked",
    "degenerate ImageOrientationPatient",
)
