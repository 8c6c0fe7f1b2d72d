"""Writing checkpoint files so that a crash (SIGKILL, power loss, Ctrl-C) never leaves a reader a half state.

The rules every writer here follows (hf2mcore, reshard, mcore2hf, the PEFT export and training saves):
  * data goes to a temporary name, is fsynced, and is renamed to its final name only when complete;
  * a directory that already exists is swapped with its replacement in one atomic step (renameat2
    RENAME_EXCHANGE on Linux; elsewhere two renames, the old one kept until the new one is in place);
  * a pointer (tracker, index) moves only after what it points to is complete, and what it no longer points
    to is removed last.
`sha256_file` streams a file in chunks so that hashing a multi-GB rank file needs no memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import signal

CRASH_ENV = "MINDSPEED_DSV_CRASH_AT"  # tests only: crash_point(name) SIGKILLs the process when this equals name
_CHUNK = 16 << 20


def crash_point(name: str) -> None:
    """A named moment of a write. The crash tests (tests/ckpt/test_crash.py) set MINDSPEED_DSV_CRASH_AT to one
    name to kill the writer exactly there; unset (always, outside those tests) this does nothing."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (its entries: the renames made in it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path` (a freshly written iteration before it is renamed in)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fsync_path(os.path.join(root, f))
        fsync_path(root)


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj, **kw) -> None:
    kw.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(obj, **kw))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, final: str) -> None:
    """Put the complete directory `new` at `final`. An existing `final` is swapped out atomically (and then
    removed), so `final` is always either the whole old or the whole new directory."""
    fsync_tree(new)
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.exists(final):
        os.replace(new, final)
    elif _exchange(new, final):
        crash_point("replace_dir:swapped")
        shutil.rmtree(new)  # now the old directory
    else:  # no atomic exchange here: keep the old one aside until the new one is in place
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)
    fsync_path(parent)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def is_empty_dir(path: str) -> bool:
    return not os.path.isdir(path) or not os.listdir(path)


def inside(path: str, parent: str) -> bool:
    """True when `path` is `parent` or lies under it (symlinks resolved)."""
    p, q = os.path.realpath(path), os.path.realpath(parent)
    return p == q or p.startswith(q.rstrip(os.sep) + os.sep)
