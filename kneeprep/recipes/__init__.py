"""The recipes shipped with kneeprep, as package data: usable by name (``--recipe 3dreasonknee``).

A recipe argument is a path to a TOML file or the name of a packaged recipe (its file name without
``.toml``). An existing file wins; otherwise the name is looked up here. :func:`resolve` turns either into
a file path, or raises :class:`~kneeprep.errors.InputNotFoundError` with one line naming the value and the
packaged names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kneeprep.errors import InputNotFoundError

SUFFIX = ".toml"


def _files() -> dict[str, Path]:
    # installed from a wheel or a source tree, the package is a folder on disk: its files are paths
    return {
        f.name[: -len(SUFFIX)]: Path(str(f))
        for f in resources.files(__name__).iterdir()
        if f.name.endswith(SUFFIX) and f.is_file()
    }


def names() -> list[str]:
    """The packaged recipes' names, sorted."""
    return sorted(_files())


def packaged(name: str) -> Path | None:
    """The file of the packaged recipe ``name``, or None."""
    return _files().get(name)


def resolve(value: str | Path) -> Path:
    """A recipe argument as a file: an existing file as given, else the packaged recipe of that name."""
    p = Path(value)
    if p.is_file():
        return p
    s = str(value)
    bare = not ("/" in s or "\\" in s or s.endswith(SUFFIX))
    found = packaged(s) if bare else None
    if found is not None:
        return found
    known = ", ".join(names()) or "none"
    if p.is_dir():
        raise InputNotFoundError(f"{p}: is a folder, not a recipe file (packaged recipes: {known})")
    if bare:
        raise InputNotFoundError(
            f"unknown recipe {s!r}: no such file, nor a packaged recipe (known: {known})"
        )
    hint = (
        f"; the packaged one is --recipe {p.stem}"
        if packaged(p.stem) is not None
        else f" (packaged recipes: {known})"
    )
    raise InputNotFoundError(f"{p}: recipe file not found{hint}")
