"""Enhanced (multi-frame) images: one header per frame from the functional groups, and the frames' pixels.

Enhanced MR Image Storage (Siemens XA, Philips, Canon), Legacy Converted Enhanced MR/CT, Enhanced CT/PET keep
per-frame geometry in functional groups (PS3.3 C.7.6.16): each frame's item of the
PerFrameFunctionalGroupsSequence (5200,9230) and the one item of the SharedFunctionalGroupsSequence
(5200,9229) hold macro sequences; a macro in the frame's item wins over the shared one. They are read with
pydicom's Dataset access (no hand parsing). :func:`frame_headers` turns a file into one
:class:`~kneeprep.dicom.slice_header.SliceHeader` per frame, so frames are grouped, ordered and checked exactly
as classic slices are (:mod:`kneeprep.dicom.qc`, :mod:`kneeprep.dicom.imagesets`).

| what | macro (tag) > attribute |
|---|---|
| position | PlanePositionSequence (0020,9113) > ImagePositionPatient (0020,0032) |
| orientation | PlaneOrientationSequence (0020,9116) > ImageOrientationPatient (0020,0037) |
| pixel spacing | PixelMeasuresSequence (0028,9110) > PixelSpacing (0028,0030), SpacingBetweenSlices (0018,0088) |
| rescale | PixelValueTransformationSequence (0028,9145) > RescaleSlope (0028,1053), RescaleIntercept (0028,1052) |
| echo | MREchoSequence (0018,9114) > EffectiveEchoTime (0018,9082) |
| time | FrameContentSequence (0020,9111) > TemporalPositionIndex (0020,9128); CardiacSynchronizationSequence (0018,9118) > NominalCardiacTriggerDelayTime (0020,9153) |
| diffusion | MRDiffusionSequence (0018,9117) > DiffusionBValue (0018,9087), DiffusionGradientDirectionSequence (0018,9076) > DiffusionGradientOrientation (0018,9089) |
| image type | MRImageFrameTypeSequence (0018,9226) / CTImageFrameTypeSequence (0018,9329) > FrameType (0008,9007), ComplexImageComponent (0008,9208) |

Pixels (:func:`read_frames`): native syntaxes are viewed in place in the file's bytes (one array per file,
frames picked from it); RLE is decoded by pydicom; the JPEG family by SimpleITK/GDCM, handed the frames
re-wrapped as a plain multi-frame object without any rescale so it returns stored values, and the per-frame
rescale is applied here (GDCM would apply one rescale to every frame).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from kneeprep.dicom.fields import complex_component
from kneeprep.dicom.input_bytes import read_input
from kneeprep.dicom.slice_header import NATIVE_SYNTAXES, PIXEL_DATA, SliceHeader
from kneeprep.errors import DicomError

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _macro(frame, shared, sequence: str):
    """The first item of functional-group macro ``sequence``: the frame's own, else the shared one."""
    for group in (frame, shared):
        if group is not None:
            seq = group.get(sequence)
            if seq:
                return seq[0]
    return None


def _value(frame, shared, sequence: str, keyword: str):
    item = _macro(frame, shared, sequence)
    return None if item is None else item.get(keyword)


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and len(out) == n else None


def _number(value, kind=float):
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _groups(ds, path: Path):
    """(shared item or None, per-frame items) of ``ds``; raises DicomError when they do not fit the frames."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if per and len(per) != n:
        raise DicomError(
            f"{path}: PerFrameFunctionalGroupsSequence (5200,9230) has {len(per)} items but NumberOfFrames "
            f"(0028,0008) is {n}: a frame's functional groups are missing"
        )
    return shared, per


def frame_headers(h: SliceHeader) -> list[SliceHeader]:
    """One header per frame of the enhanced file ``h`` (its file-level header), geometry and image-set
    attributes taken from the functional groups. A file without per-frame functional groups gives ``[h]``
    unchanged (the checklist then says what is missing). Raises DicomError naming the file otherwise."""
    import pydicom

    try:
        ds = pydicom.dcmread(h.path, stop_before_pixels=True)
        shared, per = _groups(ds, h.path)
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(f"{h.path}: functional groups cannot be read: {type(e).__name__}: {e}") from None
    if not per:
        return [h]
    is_ct = "CTImageFrameTypeSequence" in (per[0] or {}) or (
        shared is not None and "CTImageFrameTypeSequence" in shared
    )
    frame_type_seq = "CTImageFrameTypeSequence" if is_ct else "MRImageFrameTypeSequence"
    out = []
    for k, item in enumerate(per):
        frame_type = _value(item, shared, frame_type_seq, "FrameType") or ()
        frame_type = (
            (frame_type,) if isinstance(frame_type, str) else tuple(str(v).upper() for v in frame_type)
        )
        sbs = _number(_value(item, shared, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        diffusion = _macro(item, shared, "MRDiffusionSequence")
        direction = None
        if diffusion is not None and diffusion.get("DiffusionGradientDirectionSequence"):
            direction = _floats(
                diffusion.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation"), 3
            )
        out.append(
            replace(
                h,
                frame=k + 1,
                ipp=_floats(_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
                iop=_floats(_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
                spacing_between_slices=sbs if sbs is not None else h.spacing_between_slices,
                echo_number=None,
                echo_time=_number(_value(item, shared, "MREchoSequence", "EffectiveEchoTime")),
                temporal_position=_number(
                    _value(item, shared, "FrameContentSequence", "TemporalPositionIndex"), int
                ),
                trigger_time=_number(
                    _value(item, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
                ),
                b_value=_number(diffusion.get("DiffusionBValue")) if diffusion is not None else None,
                b_direction=direction,
                image_type=frame_type or h.image_type,
                complex_component=complex_component(
                    str(_value(item, shared, frame_type_seq, "ComplexImageComponent") or ""), ()
                ),
            )
        )
    return out


def frame_rescale(item, shared, ds) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of one frame: its PixelValueTransformationSequence (0028,9145),
    else the shared one, else the top-level elements (a 0 or absent slope counts as 1)."""
    pvt = _macro(item, shared, "PixelValueTransformationSequence")
    src = pvt if pvt is not None else ds
    return float(src.get("RescaleSlope", 1) or 1), float(src.get("RescaleIntercept", 0) or 0)


def read_frames(info, hasher=None) -> tuple[np.ndarray, list[tuple[float, ...] | None], list[str]]:
    """The frames ``info.frames`` (``(file index, 1-based frame)`` pairs in position order) as modality
    values, their ImagePositionPatient from the functional groups (re-read, for the position check) and a
    label per frame. Rescale is per frame; the dtype is chosen once for the volume as for classic stacks
    (:func:`kneeprep.dicom.read.rescale_dtype`). Each file is read once; ``hasher`` takes each file's name,
    a NUL and its bytes, in file order."""
    from kneeprep.dicom.read import apply_rescale, rescale_dtype

    n = len(info.frames)
    wanted: dict[int, list[tuple[int, int]]] = {}
    for k, (fi, fr) in enumerate(info.frames):
        wanted.setdefault(fi, []).append((k, fr))
    stack = None
    ipps: list = [None] * n
    rescale: list = [(1.0, 0.0)] * n
    labels = [f"{info.files[fi]} frame {fr}" for fi, fr in info.frames]
    header = None
    for fi, path in enumerate(info.files):
        path = Path(path)
        data = read_input(path, hasher)
        if fi not in wanted:
            continue
        ds, frames_all, file_header = _decode(path, data)
        if header is not None and file_header != header:
            raise DicomError(
                f"{path}: (Rows, Columns, BitsAllocated, BitsStored, signed) {file_header} differ from {header}"
            )
        header = file_header
        shared, per = _groups(ds, path)
        if stack is None:
            stack = np.empty((n, *frames_all.shape[1:]), dtype=frames_all.dtype)
        for k, fr in wanted[fi]:
            if not 1 <= fr <= frames_all.shape[0]:
                raise DicomError(f"{path}: frame {fr} is not in the file ({frames_all.shape[0]} frames)")
            stack[k] = frames_all[fr - 1]
            item = per[fr - 1] if per else None
            ipps[k] = _floats(_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
            rescale[k] = frame_rescale(item, shared, ds)
        del ds, frames_all, data
    rows, cols, bits_alloc, bits_stored, signed = header
    slopes, intercepts = [r[0] for r in rescale], [r[1] for r in rescale]
    dtype = rescale_dtype(stack.dtype, bits_stored, signed, slopes, intercepts)
    if dtype == stack.dtype and all(s == 1 and i == 0 for s, i in rescale):
        return stack, ipps, labels
    out = np.empty(stack.shape, dtype=dtype)
    for k, (s, i) in enumerate(rescale):
        out[k] = apply_rescale(stack[k], s, i, dtype)
    return out, ipps, labels


def _decode(path: Path, data: bytes):
    """(dataset, stored values of every frame as (frames, rows, columns), header tuple) of one file."""
    import pydicom

    from kneeprep.dicom.read import _native_dtype, stored_values

    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size="1 MB")
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) else ""
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        bits_alloc = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_alloc))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        spp = int(ds.get("SamplesPerPixel", 1))
    except Exception as e:
        raise DicomError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    if spp != 1:
        raise DicomError(f"{path}: SamplesPerPixel (0028,0002) {spp}: colour frames are not converted")
    if PIXEL_DATA not in ds:
        raise DicomError(f"{path}: no pixel data (PixelData (7FE0,0010) absent)")
    header = (rows, cols, bits_alloc, bits_stored, signed)
    count = frames * rows * cols
    if ts in NATIVE_SYNTAXES:
        dtype = _native_dtype(bits_alloc, signed, NATIVE_SYNTAXES[ts], path)
        raw = ds._dict[PIXEL_DATA]
        tell = getattr(raw, "value_tell", None)
        if ts != DEFLATED and getattr(raw, "value", None) is None and tell is not None:
            buf, offset = data, tell  # deferred: view the file's own bytes, no copy
            length = raw.length
        else:
            buf, offset = ds.PixelData, 0
            length = len(buf)
        if length < count * dtype.itemsize or offset + count * dtype.itemsize > len(buf):
            raise DicomError(
                f"{path}: pixel data has {length} bytes, NumberOfFrames x Rows x Columns x BitsAllocated/8 = "
                f"{count * dtype.itemsize} (a frame is missing)"
            )
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(frames, rows, cols)
        arr = arr.astype(dtype.newbyteorder("="), copy=False)
        return ds, stored_values(arr, bits_stored, signed), header
    if ts == RLE_LOSSLESS:
        try:
            arr = np.asarray(ds.pixel_array).reshape(frames, rows, cols)
        except Exception as e:
            raise DicomError(f"{path}: RLE pixel data cannot be decoded: {type(e).__name__}: {e}") from None
        return ds, stored_values(arr, bits_stored, signed), header
    return ds, _gdcm_frames(path, ds, ts, header, frames), header


def _gdcm_frames(path: Path, ds, ts: str, header, frames: int) -> np.ndarray:
    """Stored values of the encapsulated (JPEG-family) frames of ``ds``, decoded by SimpleITK/GDCM: the
    frames are re-wrapped, unchanged, as a Multi-frame Grayscale Secondary Capture object without rescale."""
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, generate_frames

    rows, cols, bits_alloc, bits_stored, signed = header
    try:
        parts = list(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as e:
        raise DicomError(
            f"{path}: encapsulated pixel data cannot be split into {frames} frames: {e}"
        ) from None
    if len(parts) != frames:
        raise DicomError(f"{path}: {len(parts)} encapsulated frames, NumberOfFrames (0028,0008) {frames}")
    w = Dataset()
    w.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3" if bits_alloc > 8 else "1.2.840.10008.5.1.4.1.1.7.2"
    w.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    w.Modality = "OT"
    w.Rows, w.Columns, w.NumberOfFrames = rows, cols, frames
    w.SamplesPerPixel, w.PhotometricInterpretation = (
        1,
        str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
    )
    w.BitsAllocated, w.BitsStored, w.HighBit = bits_alloc, bits_stored, bits_stored - 1
    w.PixelRepresentation = 1 if signed else 0
    w.PixelData = encapsulate(parts)
    w["PixelData"].VR = "OB"
    w.file_meta = FileMetaDataset()
    w.file_meta.TransferSyntaxUID = ts
    w.file_meta.MediaStorageSOPClassUID = w.SOPClassUID
    w.file_meta.MediaStorageSOPInstanceUID = w.SOPInstanceUID
    fd, tmp = tempfile.mkstemp(suffix=".dcm", prefix="kneeprep-frames-")
    os.close(fd)
    try:
        w.save_as(tmp, enforce_file_format=True)
        r = sitk.ImageFileReader()
        r.SetImageIO("GDCMImageIO")
        r.SetFileName(tmp)
        arr = sitk.GetArrayFromImage(r.Execute())
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise DicomError(f"{path}: compressed pixel data cannot be decoded by GDCM: {msg}") from None
    finally:
        os.unlink(tmp)
    arr = arr.reshape(-1, *arr.shape[-2:])
    if arr.shape != (frames, rows, cols):
        raise DicomError(f"{path}: GDCM decoded {arr.shape}, header says {frames} frames of {rows}x{cols}")
    return arr
