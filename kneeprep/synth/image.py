"""The phantom's image: what each voxel shows (:class:`Tissue`) and the DESS-like image made from it.

:func:`synthesize_image` maps tissues to DESS-like intensities (fluid and cartilage bright, fatty marrow bright,
menisci, ligaments and cortex dark), adds a smooth coil-sensitivity bias and Rician noise (magnitude of a
complex signal with Gaussian noise in both channels), and returns 12-bit integers.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """What a voxel shows in the image (independent of its mask label)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTEX = 3
    MARROW = 4
    CARTILAGE = 5
    CARTILAGE_PARTIAL = 6  # partial-thickness cartilage loss: fibrillated, intermediate signal
    FLUID = 7
    MENISCUS = 8
    MENISCUS_SIGNAL = 9  # intrasubstance meniscal signal (MOAKS morphology 1)
    LIGAMENT = 10
    BML = 11  # bone-marrow lesion: oedema-like, hyperintense on DESS
    CYST = 12  # subchondral cyst: fluid-bright, well defined
    SYNOVITIS = 13  # Hoffa-synovitis signal in the fat pad
    TENDON_SIGNAL = 14


#: DESS-like mean signal per tissue (arbitrary units, well inside 12 bits).
DESS_INTENSITY: dict[Tissue, float] = {
    Tissue.AIR: 4.0,
    Tissue.FAT: 230.0,
    Tissue.MUSCLE: 110.0,
    Tissue.CORTEX: 30.0,
    Tissue.MARROW: 260.0,
    Tissue.CARTILAGE: 330.0,
    Tissue.CARTILAGE_PARTIAL: 450.0,
    Tissue.FLUID: 620.0,
    Tissue.MENISCUS: 25.0,
    Tissue.MENISCUS_SIGNAL: 170.0,
    Tissue.LIGAMENT: 45.0,
    Tissue.BML: 470.0,
    Tissue.CYST: 700.0,
    Tissue.SYNOVITIS: 420.0,
    Tissue.TENDON_SIGNAL: 300.0,
}


def synthesize_image(
    tissue: np.ndarray, rng: np.random.Generator, *, noise_sigma: float = 14.0
) -> np.ndarray:
    """A DESS-like 12-bit image from a tissue map: per-tissue means (:data:`DESS_INTENSITY`) with a little
    per-voxel texture, a smooth multiplicative coil bias along rows and columns, and Rician noise
    ``sqrt((S + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, noise_sigma)``. Returns ``uint16`` in ``[0, 4095]``."""
    lut = np.zeros(256, dtype=np.float32)
    for t, v in DESS_INTENSITY.items():
        lut[int(t)] = v
    nz, ny, nx = tissue.shape
    bias_y = 1.0 + 0.12 * np.cos(np.linspace(-1.2, 1.2, ny, dtype=np.float32))
    bias_x = 1.0 + 0.10 * np.cos(np.linspace(-1.0, 1.4, nx, dtype=np.float32))
    bias = (bias_y[:, None] * bias_x[None, :]).astype(np.float32)
    out = np.empty(tissue.shape, dtype=np.uint16)
    sigma = np.float32(noise_sigma)
    for start in range(0, nz, 16):  # slabs bound the float32 temporaries
        sl = slice(start, min(start + 16, nz))
        signal = lut[tissue[sl]] * bias[None]
        n1 = rng.standard_normal(signal.shape, dtype=np.float32)
        n1 *= sigma
        n1 += signal
        n2 = rng.standard_normal(signal.shape, dtype=np.float32)
        n2 *= sigma
        mag = np.sqrt(n1 * n1 + n2 * n2)
        out[sl] = np.clip(np.rint(mag), 0, 4095).astype(np.uint16)
    return out
