"""Reading one DICOM file's header into a small :class:`SliceHeader` record, without decoding pixels.

The PixelData (7FE0,0010) element is *deferred*: pydicom records where its value starts and how long it
claims to be, and seeks past it. That is enough to tell, from the header alone, whether the file is
truncated (the value runs past the end of the file) or its pixel data is shorter than Rows x Columns x
SamplesPerPixel x BitsAllocated/8 x NumberOfFrames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kneeprep.dicom.fields import complex_component
from kneeprep.errors import DicomError, InputNotFoundError

PIXEL_DATA = 0x7FE00010
#: Transfer syntaxes whose PixelData is native (not encapsulated): (uid, byte order).
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99": "<",  # Deflated Explicit VR Little Endian (pydicom inflates it)
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}


class NotDicomError(DicomError):
    """The file is not DICOM at all (no ``DICM`` prefix, no plausible first element)."""

    kind = "not_dicom"


@dataclass(frozen=True)
class SliceHeader:
    """What scan needs from one file. Geometry values are ``None`` when the element is absent."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    frame_uid: str
    series_number: str
    instance_number: int | None
    patient_id: str
    study_date: str
    time_point: str  # ClinicalTrialTimePointID (0012,0051)
    description: str
    study_description: str
    laterality: str
    image_laterality: str
    modality: str
    transfer_syntax: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    n_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    spacing_between_slices: float | None  # SpacingBetweenSlices (0018,0088)
    mosaic_images: int  # Siemens NumberOfImagesInMosaic (0019,100A), 0 if absent
    has_pixels: bool
    pixel_problem: str  # "" or why the pixel data cannot be complete (truncated / short)
    # what tells the images at one position apart (kneeprep.dicom.imagesets); enhanced frames set them from
    # their functional groups (kneeprep.dicom.enhanced)
    echo_number: int | None = None  # EchoNumbers (0018,0086)
    echo_time: float | None = None  # EchoTime (0018,0081); EffectiveEchoTime (0018,9082) of a frame
    temporal_position: int | None = (
        None  # TemporalPositionIdentifier (0020,0100); TemporalPositionIndex (0020,9128)
    )
    trigger_time: float | None = None  # TriggerTime (0018,1060)
    b_value: float | None = None  # DiffusionBValue (0018,9087)
    b_direction: tuple[float, ...] | None = None  # DiffusionGradientOrientation (0018,9089)
    complex_component: str = ""  # ComplexImageComponent (0008,9208), else from ImageType: MAGNITUDE/PHASE/...
    frame: int | None = None  # 1-based frame number in a multi-frame file; None for a single-frame file

    @property
    def label(self) -> str:
        """The file name, with the frame number for a frame of a multi-frame file (for messages)."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


def looks_like_dicom(head: bytes) -> bool:
    """Whether the first bytes of a file are DICOM: ``DICM`` at offset 128 (Part 10), or a headerless
    dataset starting with a group 0x0002 or 0x0008 element in either byte order (what old scanners wrote).

    >>> looks_like_dicom(bytes(128) + b"DICM"), looks_like_dicom(b"\\x08\\x00\\x05\\x00CS\\x0a\\x00"), looks_like_dicom(b"# text")
    (True, True, False)
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ----------------------------------------------------------------------------------------------------------
# fast path: the common case parsed directly, everything else by pydicom

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_EXPLICIT_LE, _IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
#: SpecificCharacterSet (0008,0005) values whose text the fast path decodes (anything else: pydicom)
_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
#: tags the fast path keeps (group << 16 | element); everything else is skipped unread
_WANTED = frozenset({
    0x00080005, 0x00080008, 0x00080016, 0x00080018, 0x00080020, 0x00080060, 0x0008103E, 0x00081030,
    0x00100020, 0x00120051, 0x00180088, 0x0020000E, 0x00200011, 0x00200013, 0x00200032, 0x00200037,
    0x00200052, 0x00200060, 0x00200062, 0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280030,
    0x00280100, 0x00280101, 0x00280103, 0x00281052, 0x00281053,
    0x00180081, 0x00180086, 0x00181060, 0x00189087, 0x00189089, 0x00200100, 0x00089208,
})  # fmt: skip
_HEAD_BYTES = 1 << 14  # a typical MR header fits; more is read when it does not


class _Unusual(Exception):
    """Something the fast path leaves to pydicom."""


class _Short(_Unusual):
    """The header runs past the bytes read so far: read more and parse again."""


def _next_element(buf: bytes, pos: int, explicit: bool) -> tuple[int, int, int, bytes]:
    """(tag, value offset, value length, VR) of the element at ``pos``."""
    import struct

    if pos + 8 > len(buf):
        raise _Short
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item and delimiters: no VR
        return tag, pos + 8, struct.unpack_from("<I", buf, pos + 4)[0], b""
    if not explicit:
        return tag, pos + 8, struct.unpack_from("<I", buf, pos + 4)[0], b""
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Short
        return tag, pos + 12, struct.unpack_from("<I", buf, pos + 8)[0], vr
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unusual
    return tag, pos + 8, struct.unpack_from("<H", buf, pos + 6)[0], vr


def _skip_undefined(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """The offset after an undefined-length sequence whose items start at ``pos``."""
    if depth > 8:
        raise _Unusual
    while True:
        tag, start, length, _ = _next_element(buf, pos, explicit)
        if tag == _SEQ_END:
            return start
        if tag != _ITEM:
            raise _Unusual
        if length != _UNDEFINED:
            pos = start + length
            continue
        pos = start
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, start, length, _ = _next_element(buf, pos, explicit)
            if tag == _ITEM_END:
                pos = start
                break
            pos = _skip_undefined(buf, start, explicit, depth + 1) if length == _UNDEFINED else start + length


def _parse_fast(buf: bytes, size: int) -> tuple[str, dict[int, bytes], int | None, int | None]:
    """(transfer syntax, wanted raw values, PixelData value offset, its length) of a Part 10 file whose
    dataset is Explicit or Implicit VR Little Endian; raises :class:`_Unusual` otherwise."""
    import struct

    if buf[128:132] != b"DICM":
        raise _Unusual
    pos, meta = 132, {}
    while pos + 8 <= len(buf) and struct.unpack_from("<H", buf, pos)[0] == 0x0002:
        tag, start, length, _ = _next_element(buf, pos, True)
        if length == _UNDEFINED:
            raise _Unusual
        if start + length > len(buf):
            raise _Short
        meta[tag] = buf[start : start + length]
        pos = start + length
    ts = meta.get(0x00020010, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if ts not in (_EXPLICIT_LE, _IMPLICIT_LE):
        raise _Unusual
    explicit = ts == _EXPLICIT_LE
    values: dict[int, bytes] = {}
    if 0x00020002 in meta:
        values[0x00020002] = meta[0x00020002]
    while pos < size:
        tag, start, length, vr = _next_element(buf, pos, explicit)
        if tag == PIXEL_DATA:
            return ts, values, start, length
        if tag >> 16 == 0x0019 and tag & 0xFFFF == 0x100A or tag >> 16 in (0xFFFE, 0x7FE0) or tag >> 16 == 0:
            raise _Unusual  # Siemens mosaic count (private dictionary), stray delimiters, odd groups
        if length == _UNDEFINED:
            if explicit and vr != b"SQ" and vr != b"UN":
                raise _Unusual
            pos = _skip_undefined(buf, start, explicit)
            continue
        if tag in _WANTED:
            if start + length > len(buf):
                raise _Short
            values[tag] = buf[start : start + length]
        pos = start + length
    if pos != size:
        raise _Unusual
    return ts, values, None, None


def _fast_header(p: Path, size: int) -> SliceHeader | None:
    """The header of a plain Part 10 Little Endian file, parsed without pydicom, or ``None`` when the file
    needs pydicom (another transfer syntax, a character set, private tags or values the fast path does not
    decode exactly as pydicom would, a malformed or truncated header). Tested equal to the pydicom path."""
    try:
        with open(p, "rb") as fh:
            buf = fh.read(_HEAD_BYTES)
            while True:
                try:
                    ts, v, tell, length = _parse_fast(buf, size)
                    break
                except _Short:
                    if len(buf) >= min(size, 1 << 22):
                        return None
                    buf += fh.read(len(buf))  # a larger header (CSA, sequences): read on, up to 4 MiB
        return _header_from_values(p, size, ts, v, tell, length)
    except (_Unusual, OSError, ValueError, UnicodeDecodeError):
        return None


class _Values:
    """The raw values :func:`_parse_fast` kept, decoded as pydicom would decode them; anything pydicom would
    render differently (multi-valued where one value is expected, NaN, a character set not handled here)
    raises :class:`_Unusual`."""

    def __init__(self, raw: dict[int, bytes]):
        self.raw = raw
        charset = raw.get(0x00080005, b"").decode("ascii").strip()
        if charset not in _CHARSETS:
            raise _Unusual
        self.codec = _CHARSETS[charset]

    def text(self, tag: int) -> str:  # LO, SH, CS, DA: trailing padding removed
        raw = self.raw.get(tag)
        if raw is None:
            return ""
        s = raw.decode(self.codec).rstrip(" \0")
        if "\\" in s:
            raise _Unusual
        return s

    def uid(self, tag: int) -> str:
        raw = self.raw.get(tag)
        if raw is None:
            return ""
        s = raw.rstrip(b"\0 ").decode("ascii")
        if "\\" in s:
            raise _Unusual
        return s

    def us(self, tag: int, default: int) -> int:
        import struct

        raw = self.raw.get(tag)
        if raw is None:
            return default
        if len(raw) != 2:
            raise _Unusual
        return struct.unpack("<H", raw)[0]

    def _numbers(self, tag: int) -> list[str] | None:
        raw = self.raw.get(tag)
        if raw is None:
            return None
        s = raw.decode("ascii").strip(" \0")
        return [x.strip() for x in s.split("\\")] if s else []

    def integer(self, tag: int) -> str:  # IS: its text ("" when absent or empty), checked to be an integer
        vals = self._numbers(tag)
        if not vals:
            return ""
        if len(vals) != 1:
            raise _Unusual
        int(vals[0])
        return vals[0]

    def number(self, tag: int, default: float) -> float:  # one DS value; ``default`` when absent or empty
        vals = self._numbers(tag)
        if not vals:
            return default
        if len(vals) != 1:
            raise _Unusual
        x = float(vals[0])
        if x != x or x in (float("inf"), float("-inf")):
            raise _Unusual
        return x

    def opt_int(self, tag: int) -> int | None:  # one IS value, None when absent or empty
        text = self.integer(tag)
        return int(text) if text else None

    def opt_number(self, tag: int) -> float | None:  # one DS value, None when absent or empty
        return self.number(tag, None)

    def fd(self, tag: int, n: int) -> tuple[float, ...] | None:  # FD (binary doubles): None unless n values
        import struct

        raw = self.raw.get(tag)
        if raw is None or len(raw) != 8 * n:
            return None
        out = struct.unpack(f"<{n}d", raw)
        if any(x != x or x in (float("inf"), float("-inf")) for x in out):
            raise _Unusual
        return out

    def floats(self, tag: int, n: int) -> tuple[float, ...] | None:  # DS: None when absent, empty or not n
        vals = self._numbers(tag)
        if not vals:
            return None
        out = tuple(float(x) for x in vals)
        if any(x != x or x in (float("inf"), float("-inf")) for x in out):
            raise _Unusual
        return out if len(out) == n else None


def _header_from_values(p: Path, size: int, ts: str, raw: dict[int, bytes], tell, length) -> SliceHeader:
    v = _Values(raw)
    text, uid, us, integer, floats = v.text, v.uid, v.us, v.integer, v.floats
    rows, cols = us(0x00280010, 0), us(0x00280011, 0)
    n_frames = max(1, int(integer(0x00280008) or 1))
    spp = max(1, us(0x00280002, 1))
    bits_allocated = us(0x00280100, 0)
    problem = _pixel_problem(tell, length, size, rows, cols, spp, n_frames, bits_allocated)
    raw_type = raw.get(0x00080008, b"").decode(v.codec).rstrip(" \0")
    image_type = tuple(x.upper() for x in raw_type.split("\\")) if raw_type else ()
    mosaic = 2 if "MOSAIC" in image_type else 0
    instance = integer(0x00200013)
    sbs = floats(0x00180088, 1)
    return SliceHeader(
        path=p,
        sop_class_uid=uid(0x00080016) or uid(0x00020002),
        sop_instance_uid=uid(0x00080018),
        series_uid=uid(0x0020000E),
        frame_uid=uid(0x00200052),
        series_number=integer(0x00200011),
        instance_number=int(instance) if instance else None,
        patient_id=text(0x00100020),
        study_date=text(0x00080020),
        time_point=text(0x00120051),
        description=text(0x0008103E),
        study_description=text(0x00081030),
        laterality=text(0x00200060),
        image_laterality=text(0x00200062),
        modality=text(0x00080060),
        transfer_syntax=ts,
        image_type=image_type,
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        samples_per_pixel=spp,
        bits_allocated=bits_allocated,
        bits_stored=us(0x00280101, bits_allocated),
        pixel_representation=us(0x00280103, 0),
        iop=floats(0x00200037, 6),
        ipp=floats(0x00200032, 3),
        pixel_spacing=floats(0x00280030, 2),
        spacing_between_slices=sbs[0] if sbs else None,
        mosaic_images=mosaic,
        has_pixels=tell is not None,
        pixel_problem=problem,
        echo_number=v.opt_int(0x00180086),
        echo_time=v.opt_number(0x00180081),
        temporal_position=v.opt_int(0x00200100),
        trigger_time=v.opt_number(0x00181060),
        b_value=(v.fd(0x00189087, 1) or (None,))[0],
        b_direction=v.fd(0x00189089, 3),
        complex_component=complex_component(v.text(0x00089208), image_type),
    )


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
        return _slice_header(p, ds, size)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DicomError(f"{p}: bad header value: {type(e).__name__}: {e}") from None


def _pixel_problem(tell, length, size, rows, cols, spp, n_frames, bits_allocated) -> str:
    """Why native PixelData whose value starts at ``tell`` and claims ``length`` bytes cannot be complete, or
    ``""``: it runs past the end of the file, or it is shorter than the image it must hold."""
    if length is None or length == _UNDEFINED:
        return ""
    if tell is not None and tell + length > size:
        return (
            f"truncated: PixelData declares {length} bytes from offset {tell} but the file ends at "
            f"{size} ({tell + length - size} bytes missing)"
        )
    expected = rows * cols * spp * n_frames * bits_allocated // 8
    if length < expected:
        return (
            f"short pixel data: {length} bytes, Rows x Columns x SamplesPerPixel x NumberOfFrames x "
            f"BitsAllocated/8 = {rows}x{cols}x{spp}x{n_frames}x{bits_allocated}/8 = {expected}"
        )
    return ""


def _slice_header(p: Path, ds, size: int) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
        if ds.is_little_endian is False:
            ts = "1.2.840.10008.1.2.2"
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    n_frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    spp = max(1, _int(ds.get("SamplesPerPixel"), 1))
    bits_allocated = _int(ds.get("BitsAllocated"), 0)
    raw = ds._dict.get(PIXEL_DATA)
    has_pixels = raw is not None
    problem = ""
    if has_pixels and ts in NATIVE_SYNTAXES and ts != "1.2.840.10008.1.2.1.99":
        problem = _pixel_problem(
            getattr(raw, "value_tell", None), getattr(raw, "length", None), size, rows, cols, spp, n_frames,
            bits_allocated,
        )  # fmt: skip
    mosaic = _int(ds.get((0x0019, 0x100A)).value if (0x0019, 0x100A) in ds else 0)
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):  # one value: pydicom gives a str, not a list of one
        image_type = (image_type,)
    image_type = tuple(str(v).upper() for v in image_type)
    if "MOSAIC" in image_type and mosaic <= 1:
        mosaic = max(mosaic, 2)
    inst = ds.get("InstanceNumber")
    return SliceHeader(
        path=p,
        sop_class_uid=str(
            ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")
        ),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_uid=str(ds.get("FrameOfReferenceUID", "")),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        instance_number=_int(inst, None) if inst not in (None, "") else None,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        time_point=str(ds.get("ClinicalTrialTimePointID", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        laterality=str(ds.get("Laterality", "") or ""),
        image_laterality=str(ds.get("ImageLaterality", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        transfer_syntax=ts,
        image_type=image_type,
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        samples_per_pixel=spp,
        bits_allocated=bits_allocated,
        bits_stored=_int(ds.get("BitsStored"), bits_allocated),
        pixel_representation=_int(ds.get("PixelRepresentation"), 0),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        spacing_between_slices=(_floats([ds.get("SpacingBetweenSlices")], 1) or (None,))[0]
        if ds.get("SpacingBetweenSlices") not in (None, "")
        else None,
        mosaic_images=mosaic,
        has_pixels=has_pixels,
        pixel_problem=problem,
        echo_number=_opt(ds, "EchoNumbers", int),
        echo_time=_opt(ds, "EchoTime", float),
        temporal_position=_opt(ds, "TemporalPositionIdentifier", int),
        trigger_time=_opt(ds, "TriggerTime", float),
        b_value=_opt(ds, "DiffusionBValue", float),
        b_direction=_floats(ds.get("DiffusionGradientOrientation"), 3),
        complex_component=complex_component(str(ds.get("ComplexImageComponent", "") or ""), image_type),
    )


def _opt(ds, keyword: str, kind):
    """One value of ``keyword`` as ``kind`` (int or float); None when absent, empty, multi-valued or bad."""
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if value is None or value == "" or isinstance(value, MultiValue | list | tuple):
        return None
    try:
        x = kind(value)
    except (TypeError, ValueError):
        return None
    return None if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))) else x


def read_input(path: Path, hasher=None) -> bytes:
    """A DICOM file's bytes for decoding; ``hasher`` (a ``hashlib`` object), if given, is fed the file's name,
    a NUL and the bytes (the series' content hash is computed as its files are read, once)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputNotFoundError(f"{path}: cannot read input ({e.strerror or e})") from None
    if hasher is not None:
        hasher.update(path.name.encode() + b"\0")
        hasher.update(data)
    return data
