"""Paths that are URLs: ``s3://bucket/prefix``, ``memory://...``, any fsspec protocol; ``file://`` is local.

A path is a URL when it is a ``str`` with ``://`` in it. ``file://`` URLs become local :class:`~pathlib.Path`
objects and keep the local code (memory-mapped files, no fsspec). Every other URL is opened through fsspec
(``pip install 'kneeprep[s3]'`` for ``s3://``), imported only when a URL is used: credentials and endpoint come
from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ...) unless ``storage_options`` (fsspec's keyword arguments, e.g. ``{"endpoint_url": ...,
"key": ..., "secret": ...}``) say otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kneeprep.errors import KneeprepError, StoreError


def is_url(path: str | os.PathLike) -> bool:
    """True for a ``str`` of the form ``protocol://...`` other than ``file://``."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def as_local_or_url(path: str | os.PathLike) -> str | Path:
    """``path`` as a local :class:`Path` (``file://`` URLs included) or, for any other URL, the URL string
    without a trailing slash."""
    if isinstance(path, str) and path.startswith("file://"):
        return Path(unquote(urlsplit(path).path))
    if is_url(path):
        return path.rstrip("/")
    return Path(path)


def url_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """``(fsspec filesystem, path inside it)`` for ``url``; a missing fsspec/s3fs names the ``pip install``."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:
        raise KneeprepError(f"{url}: reading URLs needs fsspec: pip install 'kneeprep[s3]'") from e
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        raise KneeprepError(
            f"{url}: no fsspec filesystem for this protocol ({e}); for s3:// pip install 'kneeprep[s3]'"
        ) from e
    except (ValueError, TypeError) as e:
        raise StoreError(f"{url}: cannot open this URL: {e}") from e


def join(url: str, rel: str) -> str:
    """``url`` + ``/`` + ``rel`` (URLs and fsspec paths always use ``/``)."""
    return f"{url.rstrip('/')}/{rel.lstrip('/')}"
