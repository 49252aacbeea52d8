"""Small DICOM trees with one defect each, behind one accessor: ``make_fixture(name, tmp_path) -> Path``.

Each fixture writes a clean 8x24x20 sagittal ("PIR") MR series with ``kneeprep.synth.write_series`` into the
OAI layout ``raw/00m/0.C.2/9000296/20040909/10693717/001…008`` (unless the defect is the layout), then damages
it. The returned path is the tree to scan (``raw``). ``clean_array()`` is the series' voxels in array order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

PIR_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SHAPE = (8, 24, 20)
SPACING = (0.7, 0.5, 0.4)
OAI_SERIES = Path("00m/0.C.2/9000296/20040909/10693717")
TAGS = {
    "PatientID": "9000296",
    "StudyDate": "20040909",
    "SeriesNumber": 5,
    "SeriesDescription": "SAG_3D_DESS_RIGHT",
}


def clean_array(shape=SHAPE, dtype=np.uint16) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (100 + 200 * z + 7 * y + x).astype(dtype)


def clean_geometry(shape=SHAPE, direction=PIR_DIRECTION, origin=(12.5, -30.0, 40.0)):
    from kneeprep.geometry import Geometry, affine_from_itk

    return Geometry(shape, SPACING, affine_from_itk(origin, tuple(reversed(SPACING)), direction))


def _write(folder: Path, array=None, geometry=None, **kwargs) -> list[Path]:
    from kneeprep.synth import write_series

    array = clean_array() if array is None else array
    geometry = clean_geometry(array.shape) if geometry is None else geometry
    tags = {**TAGS, **kwargs.pop("tags", {})}
    return write_series(array, geometry, folder, tags=tags, **kwargs)


def _edit(path: Path, **changes) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def make_fixture(name: str, tmp_path: Path) -> Path:
    """Write fixture ``name`` under ``tmp_path``; returns the root to scan. Names are listed in FIXTURES."""
    if name not in FIXTURES:
        raise KeyError(f"unknown DICOM fixture {name!r}; known: {', '.join(FIXTURES)}")
    root = tmp_path / name / "raw"
    FIXTURES[name](root)
    return root


def _clean(root: Path) -> None:
    _write(root / OAI_SERIES)


def _missing_slice(root: Path) -> None:
    files = _write(root / OAI_SERIES)
    files[3].unlink()  # 004: one slice gone in the middle


def _duplicate_slice(root: Path) -> None:
    files = _write(root / OAI_SERIES)
    shutil.copy(files[4], files[4].with_name("005_copy"))  # same instance, written twice


def _duplicate_position(root: Path) -> None:
    files = _write(root / OAI_SERIES)
    dup = files[4].with_name("005b")
    shutil.copy(files[4], dup)  # a different image at the same position (re-sent with a new UID)
    _edit(dup, SOPInstanceUID="1.2.826.0.1.3680043.8.498.999", InstanceNumber=99)


def _shuffled_names(root: Path) -> None:
    _write(root / OAI_SERIES, file_names=["005", "002", "008", "001", "007", "003", "006", "004"])


def _two_series_one_folder(root: Path) -> None:
    folder = root / OAI_SERIES
    _write(
        folder, file_names=[f"a{k:03d}" for k in range(1, 9)], tags={"SeriesDescription": "SAG_3D_DESS_RIGHT"}
    )
    arr = clean_array((10, 24, 20)) + 1
    _write(
        folder,
        arr,
        clean_geometry((10, 24, 20)),
        file_names=[f"b{k:03d}" for k in range(1, 11)],
        tags={"SeriesDescription": "SAG_3D_DESS_RIGHT", "SeriesNumber": 6},
    )


def _truncated(root: Path) -> None:
    files = _write(root / OAI_SERIES)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-300])  # pixel data cut short, header intact


def _junk(root: Path) -> None:
    folder = root / OAI_SERIES
    _write(folder)
    (folder / "README.txt").write_text("notes about this series\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (root / "contents.0.C.2.csv").write_text(
        "Folder,ParticipantID\n00m/0.C.2/9000296/20040909/10693717,9000296\n"
    )


def _signed_rescale(root: Path) -> None:
    arr = clean_array().astype(np.int16) - 1500  # negative stored values: PixelRepresentation 1
    _write(root / OAI_SERIES, arr, rescale=(2.0, -1000.0))


def _float_rescale(root: Path) -> None:
    _write(root / OAI_SERIES, rescale=(0.25, 10.5))


def _no_pixel_data(root: Path) -> None:
    for f in _write(root / OAI_SERIES):
        _edit(f, PixelData=None)


def _fake_dcm(root: Path) -> None:
    folder = root / OAI_SERIES
    _write(folder)
    (folder / "scout.dcm").write_text("this is not DICOM, whatever the name says\n" * 10)


def _tilted_slice(root: Path) -> None:
    g = clean_geometry()
    from kneeprep.synth.dicom_writer import slice_geometry

    iop = slice_geometry(g)["ImageOrientationPatient"]
    c, s = np.cos(0.01), np.sin(0.01)  # 0.57 degrees about the slice normal
    row, col = np.array(iop[:3]), np.array(iop[3:])
    tilted = [*(c * row + s * col).tolist(), *(-s * row + c * col).tolist()]
    slice_tags = [None] * SHAPE[0]
    slice_tags[2] = {"ImageOrientationPatient": [f"{v:.8f}" for v in tilted]}
    _write(root / OAI_SERIES, slice_tags=slice_tags)


def _empty_file(root: Path) -> None:
    files = _write(root / OAI_SERIES)
    files[3].write_bytes(b"")  # 004 is 0 bytes


def _unicode_path(root: Path) -> None:
    _write(root / "Knie Studie ümlaut ✓" / "série 1", tags={"SeriesDescription": "SAG_3D_DESS_LEFT"})


FIXTURES = {
    "clean": _clean,
    "missing_slice": _missing_slice,
    "duplicate_slice": _duplicate_slice,
    "duplicate_position": _duplicate_position,
    "shuffled_names": _shuffled_names,
    "two_series_one_folder": _two_series_one_folder,
    "truncated": _truncated,
    "junk": _junk,
    "signed_rescale": _signed_rescale,
    "float_rescale": _float_rescale,
    "no_pixel_data": _no_pixel_data,
    "fake_dcm": _fake_dcm,
    "tilted_slice": _tilted_slice,
    "empty_file": _empty_file,
    "unicode_path": _unicode_path,
}
