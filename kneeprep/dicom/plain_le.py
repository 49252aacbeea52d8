"""Plain Part 10 files in Explicit or Implicit VR Little Endian, parsed without pydicom (about 5x faster).

The element walker (:func:`_parse_fast`) keeps the raw values of the tags scan needs and skips the rest
unread; :class:`_Values` decodes them exactly as pydicom would, and anything pydicom would render differently
(another transfer syntax, a character set, private tags, multi-valued or non-finite values, a malformed or
truncated header) raises :class:`_Unusual`, which leaves the file to pydicom
(:mod:`kneeprep.dicom.header_pydicom`). :func:`_fast_header` is tested equal to the pydicom path;
:mod:`kneeprep.dicom.read` decodes such files' pixels with the same walker.
"""

from __future__ import annotations

from pathlib import Path

from kneeprep.dicom.fields import complex_component
from kneeprep.dicom.slice_header import PIXEL_DATA, UNDEFINED_LENGTH, SliceHeader, pixel_problem

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = UNDEFINED_LENGTH
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
    0x00180081, 0x00180086, 0x00181060, 0x00189087, 0x00189089, 0x00200100, 0x00089208, 0x00200012,
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
    problem = pixel_problem(tell, length, size, rows, cols, spp, n_frames, bits_allocated)
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
        acquisition_number=v.opt_int(0x00200012),
        complex_component=complex_component(v.text(0x00089208), image_type),
    )
