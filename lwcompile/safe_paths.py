"""Two rules for the files lwcompile reads and writes.

:func:`inside`: paths read from a file lwcompile did not necessarily write (an export's ``manifest.json``) are
followed only inside the folder that holds it: no absolute path, no ``..``, no symbolic link leading out.
:func:`ordinary_mode`: a file or folder made through ``tempfile`` (0600 / 0700, private) and then moved into place
gets the permissions an ordinary ``open``/``mkdir`` would have given it (0666 / 0777 less the umask).

Example:
    >>> import os
    >>> os.makedirs("export_dir", exist_ok=True)
    >>> inside("export_dir", "params.npz") == os.path.realpath("export_dir/params.npz")
    True
    >>> inside("export_dir", "../secret.npz") is None, inside("export_dir", "/etc/passwd") is None
    (True, True)
"""
from __future__ import annotations

import os
from pathlib import Path


def inside(root: str | os.PathLike, rel: object, follow_links: bool = True) -> str | None:
    """The resolved path of ``rel`` under folder ``root``, or None when ``rel`` is not a relative path string or
    leads anywhere outside ``root``. ``follow_links=False`` judges the name alone (absolute, ``..``), for a caller
    that meets links on disk itself and refuses them (the export's check of the folder it replaces)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\0" in rel:
        return None
    if not follow_links:
        norm = os.path.normpath(rel)
        return None if norm == ".." or norm.startswith(".." + os.sep) else os.path.join(os.path.abspath(root), norm)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        return None
    return str(target)


def umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give ``path`` (a file or a folder lwcompile made) the mode an ordinary write gives: 0666 or 0777 & ~umask.

    Example:
        >>> import tempfile
        >>> fd, name = tempfile.mkstemp(dir="."); os.close(fd)
        >>> ordinary_mode(name); oct(os.stat(name).st_mode & 0o777) == oct(0o666 & ~umask())
        True
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())
