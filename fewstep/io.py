"""Atomic file writes: a run never leaves a half-written file where a finished one is expected.

Write to a temporary file in the same folder, flush and fsync it, rename it over the target (atomic on POSIX), then
fsync the folder so the rename itself survives a crash (EDM2's ``CheckpointIO`` does the same dance).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


#: OS errors a user's setting causes and can fix (a full disk, permissions, a path that is wrong): exit status 2
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                         errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})


def write_error(path: str | os.PathLike, e: OSError) -> UserError:
    """A failed write as one line naming the file, the cause and the fix (a full disk, a read-only place...)."""
    cause = e.strerror or str(e) or type(e).__name__
    if e.filename and os.fspath(e.filename) != os.fspath(path) and not str(e.filename).endswith(".tmp"):
        cause += f": {e.filename}"  # the folder that could not be made, say
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there (or choose another --out) and run again"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable or choose another --out"
    else:
        fix = "check the path or choose another --out"
    return UserError(f"cannot write {path} ({cause}); {fix} (nothing was half-written; a training run resumes "
                     "from its last checkpoint with --resume)")


def _nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` made absolute, or its nearest parent that exists."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_writable(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse up front, in one line, an output ``folder`` where nothing can be written: one below a file, or in a
    read-only or full place (a probe file is created and removed in the nearest folder that exists; nothing else
    is created). Returns ``folder``."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fewstep-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({e.strerror or e}); make it writable or "
                        f"choose another {flag}") from None
    return folder


#: room a write must leave free beyond its own bytes: torch.save's per-tensor records and pickled values, and the logs,
#: grids and TensorBoard events written beside a checkpoint (plus :data:`DISK_MARGIN_FRACTION` of the write)
DISK_MARGIN_BYTES = 64 << 20
DISK_MARGIN_FRACTION = 0.02


def show_bytes(n: float) -> str:
    """``n`` bytes in a few characters, in powers of 1000: ``812 B``, ``3.4 MB``, ``21.0 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def tensor_bytes(obj: Any) -> int:
    """The bytes ``torch.save`` writes for the tensors in ``obj`` (nested dicts, lists and tuples): each storage once
    and whole, as it is saved; a sharded tensor (DTensor) at its full size, as a full-state checkpoint holds it."""
    import torch

    seen: set[tuple[str, int]] = set()
    total = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor):
            if hasattr(x, "_local_tensor"):  # DTensor: the full tensor, gathered when saved
                total += x.numel() * x.element_size()
                continue
            storage = x.untyped_storage()
            key = (str(x.device), storage.data_ptr())
            if key not in seen or storage.data_ptr() == 0:
                seen.add(key)
                total += storage.nbytes()
    return total


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes for an unprivileged user on the file system of ``folder`` (or of its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(folder)).free


def with_margin(nbytes: int) -> int:
    """``nbytes`` plus the room a write leaves free (:data:`DISK_MARGIN_BYTES`, :data:`DISK_MARGIN_FRACTION`)."""
    return int(nbytes * (1 + DISK_MARGIN_FRACTION)) + DISK_MARGIN_BYTES


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temporary file, then atomically move it to ``path``.

    Any OS error on the way (a full disk, no permission, a read-only file system) leaves ``path`` as it was, removes
    the temporary file and is raised as a one-line :class:`UserError` naming ``path`` and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give results the usual permissions
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:  # any failure, an interrupt included: no temporary file is left behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` to ``path`` (a log such as ``metrics.jsonl``, whose reader skips a torn last line); an OS error
    is a one-line :class:`UserError` naming ``path``."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file; load it back with ``torch.load(path, weights_only=True)``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())
