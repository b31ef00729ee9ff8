"""A run's folder on disk: files replaced whole (a kill never leaves half of one), one live run per
folder, and every failure to write told in one sentence that names the path and the fix."""
import contextlib
import errno
import fcntl
import io
import json
import os
import secrets

import torch

LOCK = ".lock"          # in a run's folder: flock-ed by the run that holds it, and holds its process id
PARTIAL = ".partial"    # suffix of a file still being written; one a killed run left is removed by the next


class FolderError(Exception):
    """A folder a run cannot write to, or one another live run holds; the message names it and the fix."""


def atomic_write(path, write):
    """Call write(f) on a new file beside `path` (opened in binary mode), then rename it to `path`.
    An OSError names `path`: a full disk fails inside write(), which names no file."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{PARTIAL}")
    try:
        with open(tmp, "xb") as f:  # a new file, with the permissions the umask gives (mkstemp's are 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, tmp):
            e.filename = os.fsdecode(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(path, state):
    """torch.save atomically, so a kill never leaves half a file. It is serialized in memory first: torch.save
    into a file turns the OSError of a full disk into a RuntimeError that names no file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def write_json(path, data):
    """Write `data` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


# ---------------------------------------------------------------------------- one run per folder

@contextlib.contextmanager
def hold(folder, flag="--out"):
    """Make `folder` (created if need be) this process's alone while inside, or raise FolderError naming
    the process that holds it. The hold is an flock on folder/.lock, which the system drops when the
    process ends, however it ends, so the folder of a killed run is free at once."""
    with writing(folder, flag):
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode().strip() or "?"
            raise FolderError(f"{folder} is in use by another run (process {holder}): wait for it to end or stop "
                              f"it, or pass another {flag}") from None
        with writing(folder, flag):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            for name in os.listdir(folder):  # no other run writes here now: what is half-written is a killed run's
                if name.startswith(".") and name.endswith(PARTIAL):
                    os.remove(os.path.join(folder, name))
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- failures to write

@contextlib.contextmanager
def writing(folder, flag):
    """Inside, an OSError from writing `folder` (a file in it, one of its parents, or no file named)
    becomes a FolderError: one sentence with the path, what went wrong and the fix, for the folder
    that `flag` (--out, --cache-dir) named. Other errors pass through unchanged."""
    try:
        yield
    except OSError as e:
        path = os.fsdecode(e.filename) if e.filename is not None else os.fsdecode(folder)
        problem = explain(e.errno, path, folder, flag)
        if problem is None or not related(path, folder):
            raise
        raise FolderError(f"cannot write {path}: {problem}") from e


def explain(code, path, folder, flag):
    """What errno `code` means for writing `path` (under `folder`, which `flag` named) and the fix, or None
    for an error that is not about writing."""
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = file_in_the_way(path)
        if os.path.abspath(blocker) == os.path.abspath(folder):
            return f"it is a file, not a folder; pass {flag} a folder"
        return f"{blocker} is a file, not a folder; pass {flag} a path outside it"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied; pass {flag} a folder you may write to, or get write permission there"
    if code == errno.EROFS:
        return f"the file system is read-only; pass {flag} a folder on a writable disk"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ("no space left on the device; free some space, then rerun the same command "
                "(what was written before is kept)")
    return None


def file_in_the_way(path):
    """`path` or the nearest of its parents that is a file, where a folder should be (`path` if none is)."""
    here = path
    while here and not os.path.isfile(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    return here if here and os.path.isfile(here) else path


def related(path, folder):
    """Whether `path` is `folder`, inside it, or one of its parents (made on the way to it)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) in (path, folder)
