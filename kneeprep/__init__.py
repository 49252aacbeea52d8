"""kneeprep: rebuild 3DReasonKnee-style training data from raw OAI knee MRI.

Stages (each a plain function of typed records, see ``docs/DESIGN.md``):
scan -> convert -> boxes -> shards -> loader, driven end to end by ``kneeprep rebuild``.
"""

__version__ = "0.1.0"

#: Version of the on-disk formats (Zarr volume store attributes, Parquet shard schema, manifest).
#: Bump on any change a reader could notice.
FORMAT_VERSION = 1
