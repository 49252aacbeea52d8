"""Volume transforms: pure functions of ``(array, Geometry, params)`` returning new arrays and geometries.

Each step is split TorchIO-style into *choosing* its parameters and *applying* them:

=============  ==========================================  ===========================================
step           plan (inspect, decide)                      apply (deterministic)
=============  ==========================================  ===========================================
``orient``     :func:`plan_orient(geometry, code)`         :func:`apply_orient(array, geometry, p)`
``mirror``     :func:`plan_mirror(geometry, knee_side, on)`  :func:`apply_mirror(array, geometry, p)`
``resample``   :func:`plan_resample(geometry, spacing, …)`  :func:`apply_resample(array, geometry, p)`
``normalize``  :func:`plan_normalize(array, intensity)`     :func:`apply_normalize(array, p)`
=============  ==========================================  ===========================================

A params record is a frozen dataclass with ``to_json()``/``from_json()``; the convert stage stores each one in
the volume's attributes, so ``apply_*(raw, geometry, Params.from_json(attrs[...]))`` reproduces the stored
volume. No function here reads files, knows about Dask or about the recipe file format.
"""

from kneeprep.transforms.mirror import MirrorParams, apply_mirror, plan_mirror
from kneeprep.transforms.normalize import NormalizeParams, apply_normalize, plan_normalize
from kneeprep.transforms.orient import OrientParams, apply_orient, plan_orient
from kneeprep.transforms.resample import ResampleParams, apply_resample, plan_resample

__all__ = [
    "MirrorParams",
    "NormalizeParams",
    "OrientParams",
    "ResampleParams",
    "apply_mirror",
    "apply_normalize",
    "apply_orient",
    "apply_resample",
    "plan_mirror",
    "plan_normalize",
    "plan_orient",
    "plan_resample",
]
