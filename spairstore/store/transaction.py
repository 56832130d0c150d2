"""The one crash-safety mechanism of every job that writes a store or part of one: ``pack``,
``features`` (and :func:`spairstore.add_feature_set`) and ``convert``.

A :class:`Transaction` on a *target* (the store path) for a *purpose* (``pack``, ``convert``,
``features-<name>``) owns a staging folder at a fixed path beside the target,
``.<target name>.<purpose>.staging/``: the same path every run, so a killed run's staging is reused
(resumed) or swept by the next run of that purpose, never piled up. In it:

* ``lock`` -- held with ``flock`` while a process runs the transaction: a second run is refused;
* ``settings.json`` -- what the run makes (options, source digests): a run with equal settings resumes
  the staged work, one with other settings is refused with a one-line error naming the difference,
  unless it restarts (then everything staged is discarded);
* ``done-<k>.u8`` -- per-part done flags (one byte per row; part ``k`` is one writing process), made
  durable only after the rows they flag (:class:`RowFlags`);
* whatever the job stages (the new store, a feature-set file), written with :func:`write_atomic`
  (fsync of the file, rename, fsync of the folder);
* ``switch.json`` -- only while a directory replaces another without ``renameat2(RENAME_EXCHANGE)``
  (see :meth:`Transaction.switch`).

Beside the staging folders, the job lock ``.<target name>.busy`` (deleted by its last holder): a job
changing the target in place (``features-<name>``) holds it shared, one replacing the target (``pack``,
``convert``) exclusive, so a store is never switched away under a set being written into it.

The finished result replaces the target atomically: a file with ``rename``; a directory with
``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15 on most file systems), else with two renames recorded
in ``switch.json`` first, which :func:`recover` completes (the next transaction on the target, or
opening it), saying so on stderr. Either way, a process killed at any moment leaves the old target
or the new one at the path.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import SpairstoreError
from ..core.tables import mib

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: False: always switch directories with the recorded two-rename fallback (the crash tests set it).
EXCHANGE = True


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk is full (h5py's errors carry the errno only in their text)."""
    return isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left on device" in str(e))


def through_link(path: str | Path) -> Path:
    """Where a job writes the store named ``path``: a symbolic link's target (as :class:`~spairstore.Store`
    opens it), so that replacing the store keeps the link and its target's disk; other paths as given."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def staging_path(target: Path, purpose: str) -> Path:
    """The fixed staging folder of ``purpose`` on ``target``."""
    return target.with_name(f".{target.name}.{purpose}.staging")


def fsync_path(path: Path) -> None:
    """Make a file's data (or a folder's entries) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` as a hard link of ``src`` (a copy across file systems): for files never written in place,
    which two stores may then share."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` durably: a crash leaves the old content or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel or file system cannot."""
    if not EXCHANGE:
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _say(message: str) -> None:
    print(f"spairstore: {message}", file=sys.stderr)


def recover(target: Path) -> None:
    """Complete a directory switch of ``target`` that a killed process left half done (see the module
    doc): the new store it had finished is moved into place, the old one removed; says so on stderr.
    Waits for a live process that is switching."""
    target = Path(target)
    for intent in target.parent.glob(f".{glob.escape(target.name)}.*.staging/switch.json"):
        with open(intent.parent / "lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a live switch takes milliseconds
            _complete_switch(target, intent)


def _complete_switch(target: Path, intent: Path) -> None:
    """Finish the switch ``intent`` records, if it is still there (the caller holds the lock)."""
    if not intent.exists():
        return
    plan = json.loads(intent.read_text())
    new, old = Path(plan["new"]), Path(plan["old"])
    if new.exists():  # stopped before the new store was in place: finish moving it in
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        fsync_path(target.parent)
        _say(f"{target}: finished replacing it by the store an interrupted {plan['purpose']} had built")
    remove(old)
    intent.unlink()
    fsync_path(intent.parent)


class Transaction:
    """One run of a job on ``target`` (see the module doc). :meth:`open` locks the staging folder,
    :meth:`begin` compares or records the settings; the job stages its work under :attr:`dir`,
    then :meth:`switch` puts the result in place and :meth:`finish` removes the staging folder.
    Other processes of the same run (torchrun) use :meth:`attach`, without the lock."""

    def __init__(self, target: Path, purpose: str, lock: Any = None,
                 error: type[SpairstoreError] = SpairstoreError):
        self.target = Path(target)
        self._error = error  # what this job's refusals raise
        self.purpose = purpose
        self.dir = staging_path(self.target, purpose)
        self._lock = lock
        self._busy: int | None = None  # the descriptor of the target's job lock (see open)
        self.settings: dict[str, Any] = {}

    @classmethod
    def open(cls, target: Path, purpose: str, who: str, error: type[SpairstoreError] = SpairstoreError
             ) -> Transaction:
        """Lock the staging folder of ``purpose`` on ``target`` (creating it), after completing any
        switch a killed process left half done. ``who`` names the job in the error a second,
        concurrent run gets (e.g. ``pack``). Jobs that change the target in place (``features-*``) may
        run side by side; a job that replaces it (``pack``, ``convert``) runs alone: a Zarr set being
        written into a store directory that a pack moves away would fail half done, or publish into
        the new store a set of the old one's images."""
        target = Path(target)
        if not target.parent.is_dir():
            raise error(f"{target.parent}: output directory does not exist")
        replaces = not purpose.startswith("features-")
        try:
            busy, held_by_features = _job_lock(target, replaces)
        except OSError as e:
            raise error(f"{target.with_name(f'.{target.name}.busy')}: cannot create the job lock file of "
                        f"{target.name} ({e.strerror})") from None
        if busy is None:
            if held_by_features:
                raise error(f"{target}: a `spairstore features` run is adding or dropping a set of it; wait for it "
                            f"to finish (or stop it) and run {who} again")
            raise error(f"another pack or convert is writing {target}; wait for it to finish" if replaces else
                        f"{target}: a pack or convert is replacing it; wait for that to finish and start again")
        try:
            return cls._open(target, purpose, who, error, busy)
        except BaseException:
            _release_job_lock(target, busy)
            raise

    @classmethod
    def _open(cls, target: Path, purpose: str, who: str, error: type[SpairstoreError], busy: int) -> Transaction:
        recover(target)
        d = staging_path(target, purpose)
        try:
            d.mkdir(exist_ok=True)
            lock = open(d / "lock", "a+b")  # noqa: SIM115 - held until close()
        except OSError as e:
            raise error(f"{d}: cannot create the staging folder ({e.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise error(f"another {who} is writing {target} (its staging folder {d} is locked)") from None
        tx = cls(target, purpose, lock, error)
        tx._busy = busy
        return tx

    @classmethod
    def attach(cls, target: Path, purpose: str) -> Transaction:
        """The transaction another process of this run opened and began."""
        tx = cls(target, purpose)
        tx.settings = json.loads((tx.dir / "settings.json").read_text())
        return tx

    def staged_settings(self) -> dict[str, Any] | None:
        """The settings of the run whose work is staged, or None (nothing staged)."""
        try:
            value = json.loads((self.dir / "settings.json").read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def begin(self, settings: dict[str, Any], restart: bool = False,
              describe: Callable[[dict[str, Any], dict[str, Any]], str] | None = None,
              refuse: Callable[[str], SpairstoreError] | None = None) -> bool:
        """Resume the staged work if it was made with ``settings``, else (only with ``restart``, or when
        nothing is staged) discard it and record ``settings``. Returns whether work was resumed.
        Refusing raises ``refuse(difference)``, the difference from ``describe(old, new)``."""
        old = self.staged_settings()
        if old == settings:
            self.settings = old
            return True
        if old is not None and not restart:
            why = (describe or _differences)(old, settings)
            raise (refuse or (lambda d: SpairstoreError(
                f"{self.dir}: an unfinished {self.purpose} of {self.target} used other settings ({d}); "
                f"re-run with those settings to resume it, or restart it")))(why)
        self.discard()  # "nothing staged" until the settings exist again
        write_atomic(self.dir / "settings.json", json.dumps(settings, indent=1).encode())
        self.settings = settings
        return False

    def reserve(self, need: int, what: str, staged: int | None = None, elsewhere: bool = True) -> None:
        """Refuse, before any writing, a job whose ``need`` bytes (``what`` they are, for the message)
        do not fit on the target's disk. ``staged``: bytes of it already written (resuming); by default
        the blocks the staging folder holds. ``elsewhere``: the job could write to another disk."""
        if staged is None:
            staged = sum(f.stat().st_blocks * 512 for f in self.dir.rglob("*")
                         if f.is_file() and f.name not in ("lock", "settings.json"))
        need += need // 100 + 2**20  # tables and container metadata, which the callers do not count
        free = shutil.disk_usage(self.target.parent).free
        if need - staged > free:
            more = f" ({mib(need - staged)} of it not yet written)" if staged else ""
            raise self._error(f"{self.target}: {what} needs about {mib(need)}{more} and {self.target.parent} "
                                  f"has {mib(free)} free; make room{' or write elsewhere' if elsewhere else ''}")

    def discard(self) -> None:
        """Forget the staged work and its settings: the next :meth:`begin` starts afresh."""
        (self.dir / "settings.json").unlink(missing_ok=True)
        self.reset()

    def reset(self) -> None:
        """Forget every staged part (keep the lock and the settings)."""
        for p in self.dir.iterdir():
            if p.name not in ("lock", "settings.json"):
                remove(p)

    # -- per-part done flags ----------------------------------------------------------------------
    def forget_parts(self) -> None:
        """Forget which rows are done (their data is gone or unusable)."""
        for f in self.dir.glob("done-*.u8"):
            f.unlink()

    def flags(self, part: int, rows: int, durable: Callable[[], None] | None = None,
              sync_seconds: float = 2.0) -> RowFlags:
        """Part ``part``'s done flags over ``rows`` rows; ``durable`` makes its rows' data durable."""
        return RowFlags(self.dir / f"done-{part}.u8", rows, durable, sync_seconds)

    def done(self, rows: int) -> np.ndarray:
        """Rows flagged done by any part: bool (rows,)."""
        done = np.zeros(rows, dtype=bool)
        for f in sorted(self.dir.glob("done-*.u8")):
            flags = np.fromfile(f, dtype=np.uint8)
            if len(flags) != rows:
                raise SpairstoreError(f"{f}: has {len(flags)} flags for {rows} rows; delete {self.dir} to "
                                      f"start over")
            done |= flags.astype(bool)
        return done

    # -- putting the result in place --------------------------------------------------------------
    def switch(self, new: Path, target: Path | None = None) -> None:
        """Durably replace ``target`` (default: the transaction's) by ``new`` (a finished file or
        folder in the staging folder): old or new at the path whatever moment a crash comes."""
        target = self.target if target is None else Path(target)
        new = Path(new)
        fsync_paths([new, *new.rglob("*")] if new.is_dir() else [new])
        if not (new.is_dir() or target.is_dir()) or not target.exists():
            os.replace(new, target)
        elif _exchange(new, target):
            fsync_path(target.parent)
            remove(new)  # the old store, now at the staging path
        else:
            intent = self.dir / "switch.json"
            old = self.dir / f"old-{target.name}"
            write_atomic(intent, json.dumps({"new": str(new), "old": str(old), "purpose": self.purpose}).encode())
            os.replace(target, old)
            os.replace(new, target)
            fsync_path(target.parent)
            remove(old)
            intent.unlink()
        fsync_path(target.parent)

    def finish(self) -> None:
        """Remove the staging folder (the work is in place, or abandoned) and release the lock. A
        switch this process began and did not end (an exception between its renames) is completed
        first: the target is never left empty."""
        try:
            _complete_switch(self.target, self.dir / "switch.json")
            remove(self.dir)
        finally:
            self.close()  # a failed completion is retried by the next open, which needs the lock free

    def close(self) -> None:
        """Release the lock, keeping what is staged (for a resume)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._busy is not None:
            _release_job_lock(self.target, self._busy)
            self._busy = None


def _job_lock(target: Path, exclusive: bool) -> tuple[int | None, bool]:
    """Lock ``target``'s job lock file ``.<name>.busy`` exclusive (a job replacing the target) or shared
    (one changing it in place). Returns its descriptor, or None and whether shared holders (rather than
    an exclusive one) refused it. The last holder deletes the file (:func:`_release_job_lock`)."""
    path = target.with_name(f".{target.name}.busy")
    for _ in range(10):
        fd = _lock_at(path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if fd is not None:
            return fd, False
        time.sleep(0.01)  # a last holder deleting the file holds it exclusive for an instant
    probe = _lock_at(path, fcntl.LOCK_SH) if exclusive else None  # refused only while a job holds it exclusive
    if probe is not None:
        os.close(probe)
    return None, probe is not None


def _lock_at(path: Path, kind: int, block: bool = False) -> int | None:
    """A descriptor of the file at ``path`` (created if missing) locked with ``kind``, or None where the
    lock is refused (without ``block``). A lock counts only on the file still at the path, which its
    last holder deletes: else it is taken again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind if block else kind | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # deleted by its last holder meanwhile


def _release_job_lock(target: Path, fd: int) -> None:
    """Unlock a job lock of :func:`_job_lock`, deleting the file if no other job holds it."""
    path = target.with_name(f".{target.name}.busy")
    if _try_flock(fd, fcntl.LOCK_EX) and _same_file(fd, path):
        path.unlink()
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Serialise the commits of transactions of different purposes that change one shared file of
    ``target`` (a Zarr store's root metadata), with the lock file ``.<name>.lock``, deleted on release."""
    path = target.with_name(f".{target.name}.lock")
    fd = _lock_at(path, fcntl.LOCK_EX, block=True)
    assert fd is not None  # a blocking lock is never refused
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: nothing is left beside the store
        os.close(fd)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def fsync_paths(paths: Iterable[Path]) -> None:
    """:func:`fsync_path` for many files and folders at once."""
    # Concurrent fsyncs share journal commits: ~40x faster than one by one for a store's files here.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fsync_path, paths))


class RowFlags:
    """One part's done flags, ``done-<k>.u8``: one byte per row. Rows are flagged at the next
    :meth:`sync` after :meth:`written` reports them, and only once ``durable()`` has made their data
    durable, so after a kill (even of the machine) every flagged row is complete."""

    def __init__(self, path: Path, rows: int, durable: Callable[[], None] | None = None,
                 sync_seconds: float = 2.0):
        self.path = path
        #: seconds between syncs (each waits for the disk: once per batch cost ~0.4 s on a busy VM)
        self.sync_seconds = sync_seconds
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.truncate(rows)  # zero flags
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._fd = os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != rows:
            os.close(self._fd)
            raise SpairstoreError(f"{path}: flag file has the wrong size; delete {path.parent} to start over")
        self._durable = durable
        self._pending: list[np.ndarray] = []
        self._synced = time.monotonic()

    def written(self, rows: np.ndarray) -> None:
        """Flag ``rows`` at the next sync: their data is written (durable once ``durable()`` ran)."""
        self._pending.append(np.asarray(rows, dtype=np.int64))
        if time.monotonic() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Make the written rows durable, then flag them done (durably)."""
        if self._pending:
            rows = np.sort(np.concatenate(self._pending))
            if self._durable is not None:
                self._durable()
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                os.pwrite(self._fd, b"\x01" * int(b - a), int(rows[a]))
            os.fdatasync(self._fd)
            self._pending = []
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flag the rows written so far and close the file."""
        try:
            self.sync()
        finally:
            os.close(self._fd)
