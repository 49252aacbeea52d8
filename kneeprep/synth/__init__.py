"""The OAI-like sample generator behind ``kneeprep synth``.

``dicom_writer.write_series`` writes any ``(z, y, x)`` array as a classic MR Image Storage series; test
fixtures build their defective series on it.
"""

from __future__ import annotations

from .dicom_writer import make_uid, write_series

__all__ = ["make_uid", "write_series"]
