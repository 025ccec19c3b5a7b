"""Atomic file and folder writes: a crash leaves either the old content or the new, never half.

Replacing a folder (RUN_DIR, a fine-tuning checkpoint) with :func:`atomic_directory`:

1. ``recover(path)`` clears what an earlier, killed save left behind (see below);
2. the new content is written into ``.NAME.XXXXXXXX.tmp`` beside ``path`` and fsynced; the writing
   process holds an ``flock`` on that folder, so others can tell a live save from a dead one;
3. the swap, under an ``flock`` on the parent folder (one swap per folder at a time):

   - Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in one step; ``path`` holds the old
     content or the new at every instant, and the old content, now under the ``.tmp`` name, is removed;
   - elsewhere (or a file system without it): ``path`` is renamed to ``.NAME.old-STAMP`` (a folder
     cannot be renamed onto a non-empty one), the ``.tmp`` folder to ``path``, and the old one removed.
     Killed between those two renames, ``path`` is missing until the next ``recover``, which renames
     the newest ``.NAME.old-*`` back;
4. the parent folder is fsynced, so the rename itself survives a power cut.

``recover(path)`` runs at the start of every save and every load (artifacts/store.py): when ``path``
is missing it restores the newest ``.NAME.old-*``; it removes the other ``.NAME.old-*`` folders and
every ``.NAME.XXXXXXXX.tmp`` folder whose writer is gone (no process holds its lock). A save still
in progress is never touched. Without ``fcntl`` (Windows) liveness cannot be told, so ``.tmp``
folders are left in place and only ``.old-*`` folders are restored or removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- folders ---------------------------------------------------------------------------------------------


def _tmp_pattern(name: str) -> re.Pattern:
    # mkdtemp's 8 random characters: ``.run.checkpoint.XXXXXXXX.tmp`` is not a leftover of ``run``.
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def _old_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.old-([0-9]+)(?:-[0-9]+)?")  # also the older ``.NAME.old-PID``


def _fsync_dir(folder) -> None:
    """Make the entries of ``folder`` (a rename into or out of it) durable; best effort where a file
    system does not support fsync on folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (the new content is on disk before it is renamed in)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


@contextlib.contextmanager
def _locked(folder, *, blocking: bool = True):
    """An exclusive ``flock`` on ``folder`` while the block runs; yields False when ``blocking`` is off and
    another process (or another open of it) holds the lock, or when locks are unavailable."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _exchange(a, b) -> bool:
    """Swap folders ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform, the C library or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """``.NAME.XXXXXXXX.tmp`` and ``.NAME.old-*`` folders beside ``path`` (olds newest first)."""
    tmp_re, old_re = _tmp_pattern(path.name), _old_pattern(path.name)
    tmps, olds = [], []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return [], []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if tmp_re.fullmatch(entry.name):
            tmps.append(Path(entry.path))
        elif match := old_re.fullmatch(entry.name):
            olds.append((int(match.group(1)), Path(entry.path)))
    return tmps, [p for _, p in sorted(olds, key=lambda item: item[0], reverse=True)]


def _recover_locked(path: Path) -> list[str]:
    """``recover`` for a caller that holds the parent folder's lock."""
    notes = []
    tmps, olds = _leftovers(path)
    if olds and not os.path.lexists(path):
        try:
            os.rename(olds[0], path)  # a save was killed between its two renames: the previous content returns
        except OSError as e:  # e.g. a read-only folder: leave everything as it is; loading then says it is missing
            return [f"could not restore {path} from {olds[0].name}: {e.strerror or e}"]
        _fsync_dir(path.parent)
        notes.append(f"restored {path} from {olds[0].name} (a save was interrupted)")
        olds = olds[1:]
    for old in olds:  # created and consumed under the parent lock: whoever made it is gone
        shutil.rmtree(old, ignore_errors=True)
        notes.append(f"removed {old.name} (left by an interrupted save)")
    if fcntl is not None:
        for tmp in tmps:
            with _locked(tmp, blocking=False) as free:
                if free:  # no live writer holds it
                    shutil.rmtree(tmp, ignore_errors=True)
                    notes.append(f"removed {tmp.name} (left by an interrupted save)")
    return notes


def recover(path) -> list[str]:
    """Undo what a killed :func:`atomic_directory` save left beside ``path``; returns what it did.

    Restores ``path`` from the newest ``.NAME.old-*`` when ``path`` is missing; removes the other
    ``.NAME.old-*`` folders and the ``.NAME.XXXXXXXX.tmp`` folders no live process is writing.
    Cheap when there is nothing to do; never raises for a folder it cannot read.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    with _locked(path.parent) as held:
        if not held and fcntl is not None:
            return []  # the parent cannot be opened: nothing this process could repair either
        return _recover_locked(path)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    On an exception the temporary folder is removed and ``path`` is left untouched; if the process is
    killed instead, ``path`` holds the old or the new content and the next save (or ``recover``) clears
    the leftovers. See the module docstring for each step.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
    with _locked(path.parent):  # recovery, then a temporary folder locked before anyone can see it unlocked
        _recover_locked(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        writer = os.open(tmp, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(writer, fcntl.LOCK_EX)  # held until the end: a live save's folder is never removed
    old = None
    committed = False
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        _fsync_tree(tmp)
        with _locked(path.parent):
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
            if path.is_dir() and _exchange(tmp, path):
                committed = True  # ``path`` holds the new content; ``tmp`` now names the old
                _fsync_dir(path.parent)
            else:
                if path.is_dir():
                    old = path.with_name(f".{path.name}.old-{time.time_ns()}-{os.getpid()}")
                    os.rename(path, old)
                os.rename(tmp, path)
                committed = True
                _fsync_dir(path.parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the old content, after an exchange
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new content (or, after an exchange, the old)
        if old is not None and os.path.lexists(old):
            if committed:
                shutil.rmtree(old, ignore_errors=True)
            elif not os.path.lexists(path):
                with contextlib.suppress(OSError):
                    os.rename(old, path)  # failed between the two renames: the old content goes back
        raise
    finally:
        os.close(writer)
