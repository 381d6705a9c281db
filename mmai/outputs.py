"""Outputs of the command-line verbs: checked before any work, one writer at a time.

- :func:`check_writable`: an output (file or folder, existing or to be made) that cannot be
  written is refused before anything runs (one line, exit 2), instead of failing after an hour
  of preprocessing or after the predictions were written.
- :class:`OutputLock`: one process writes an output at a time. The lock is a small JSON file
  (``pid``, ``host``, ``verb``, ``started``) created atomically (``O_CREAT | O_EXCL``) next to the
  output; a second run on the same output is refused in one line naming the running process. A
  lock left by a process that no longer runs on this host (a killed run) is taken over. Shards
  (``--shard I/N``) lock their own name, so they still run in parallel.
- :func:`guard`: what ``mmai VERB`` checks and locks, from its parsed arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmai.errors import MmaiError

log = logging.getLogger(__name__)


class OutputError(MmaiError):
    """An output that cannot be written, or that another process is writing."""


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_dir(folder: Path) -> None:
    """Create and remove a file in ``folder`` (the only test that holds for root, read-only mounts, ACLs)."""
    fd, name = tempfile.mkstemp(prefix=".mmai-write-test-", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable(path: Path | str, *, kind: str, flag: str = "--out") -> None:
    """Refuse an output that cannot be written: ``kind`` ``file`` (written or appended) or ``dir``.

    Creates nothing (missing parent folders are made later by the verb itself, as before).

    Raises:
        OutputError: one line naming the option, the path and the reason.
    """
    path = Path(path)
    try:
        if kind == "file" and path.exists():
            if path.is_dir():
                raise OutputError(f"{flag} {path} is an existing folder; give a file path")
            with path.open("ab"):
                pass
            return
        if kind == "dir" and path.exists() and not path.is_dir():
            raise OutputError(f"{flag} {path} is an existing file; give a folder")
        base = _existing_ancestor(path if kind == "dir" else path.parent)
        if not base.is_dir():
            raise OutputError(f"{flag} {path}: {base} is a file, so nothing can be written below it")
        _probe_dir(base)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{flag} {path} cannot be written ({reason}); choose a writable location") from exc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive, stale-aware lock file for one output.

    Args:
        lock_path: the lock file (e.g. ``P.csv.lock`` or ``OUT/.mmai-train.lock``).
        verb: the verb holding it (named in the refusal).
        output: the output it protects (named in the refusal).
    """

    def __init__(self, lock_path: Path, verb: str, output: Path) -> None:
        self.path = Path(lock_path)
        self.verb = verb
        self.output = output
        self.held = False

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "verb": self.verb,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._info(), fh)
        return True

    def acquire(self) -> None:
        """Take the lock, or take over a stale one.

        Raises:
            OutputError: another live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
                log.warning("%s: taking over the lock of %s (pid %d), which no longer runs", self.output,
                            holder.get("verb", "a run"), pid)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            if not holder and time.time() - self.path.stat().st_mtime < 5:
                time.sleep(0.2)  # being written right now
                continue
            who = f"mmai {holder.get('verb', '?')} (pid {pid} on {host}, started {holder.get('started', '?')})"
            raise OutputError(f"{self.output} is being written by {who}; wait for it to finish, or delete "
                              f"{self.path} if that process is gone")
        raise OutputError(f"{self.output}: could not take the lock {self.path}; delete it if no mmai run uses it")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _shard_tag(args: argparse.Namespace) -> str:
    shard = getattr(args, "shard", None)
    return f".shard{shard[0]}of{shard[1]}" if shard else ""


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def guard(verb: str, args: argparse.Namespace) -> Iterator[None]:
    """Check every output of ``mmai VERB`` is writable, then hold its lock while the verb runs.

    Locked: predict (``P.csv.lock``), preprocess (``OUT/.mmai-preprocess[.shardIofN].lock``) and
    train (``OUT/.mmai-train.lock``); under torchrun rank 0 holds the lock for the whole job (the
    ranks write part files that rank 0 merges). Checked only: the other outputs.
    """
    out = getattr(args, "out", None)
    file_out = verb in ("scan", "predict", "export", "clinical-schema")
    if out is not None:
        check_writable(Path(out), kind="file" if file_out else "dir")
    if getattr(args, "explain", None):
        check_writable(Path(args.explain), kind="dir", flag="--explain")
    lock: OutputLock | None = None
    if not _is_rank0():  # under torchrun rank 0 holds the job's lock; the ranks write parts it merges
        yield
        return
    if out is not None and verb == "predict":
        out = Path(out)
        lock = OutputLock(out.with_name(out.name + ".lock"), verb, out)
    elif out is not None and verb == "preprocess":
        lock = OutputLock(Path(out) / f".mmai-preprocess{_shard_tag(args)}.lock", verb, Path(out))
    elif out is not None and verb == "train":
        lock = OutputLock(Path(out) / ".mmai-train.lock", verb, Path(out))
    if lock is None:
        yield
        return
    with lock:
        yield


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space (not a problem of the case being written): stop the run."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_error_message(exc: OSError, verb: str = "") -> str:
    """One line for a write failure in the middle of a run, saying how to resume it."""
    where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
    again = ("run the same command with --resume (training continues from its last checkpoint)" if verb == "train"
             else "run the same command again (finished cases are kept and skipped)")
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}; free some space and {again}"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}; free some space and {again}"
    return f"{exc.strerror or type(exc).__name__}{where} (errno {exc.errno})"
