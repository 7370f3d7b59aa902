"""The run directory (--out) belongs to the user: one trainer at a time, no silent overwrite, a
log that matches the checkpoint.

    with RunDir(out, resume=..., overwrite=...) as rd:   # lock; refuse a finished/partial run
        log = rd.log(resume_step)                        # log.jsonl, cut back to the checkpoint

- Lock: `<out>/.lock` holds the owner's pid and host, created whole and exclusively (a hard
  link of a written file); released on exit. A lock whose pid is dead on this host is stale and
  taken over (a `kill -9` leaves one behind); two trainers finding the same stale lock do not
  remove each other's new one.
- Guard: a directory that holds a run (checkpoint, summary, model or log) is refused unless the
  command says `--resume` (continue it) or `--overwrite` (delete the run's files first, so that
  no summary or model of the old run stays beside the new run's checkpoint).
- Log: on resume, `log.jsonl` keeps only the records up to the checkpoint's step, so the steps
  replayed after a kill are logged once.
"""
import json
import os
import socket
import time
from typing import Optional

LOCK = ".lock"
RUN_FILES = ("checkpoint.pt", "summary.json", "model.safetensors", "log.jsonl")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> Optional[dict]:
    """A lock file's owner: {} if there is no such file, None if it is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None


class RunDir:
    def __init__(self, out: str, resume: bool = False, overwrite: bool = False,
                 enabled: bool = True):
        """enabled: False on every rank but 0 (rank 0 owns the directory)."""
        self.out, self.resume, self.overwrite, self.enabled = out, resume, overwrite, enabled
        self.lock_path = os.path.join(out, LOCK)
        self._locked = False

    # -------------------------------------------------------------------------------- lock
    def acquire(self) -> "RunDir":
        if not self.enabled:
            return self
        os.makedirs(self.out, exist_ok=True)
        me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time())
        for _ in range(5):
            if self._create(me):
                break
            owner = self._owner()
            if owner is None or self._stale(owner):
                self._take_over(owner)  # a dead trainer's (or unreadable) lock
                continue
            raise RuntimeError(
                f"--out {self.out} is in use by another trainer (pid {owner.get('pid')} on "
                f"{owner.get('host')}, lock file {self.lock_path}); wait for it to finish or "
                "choose another --out. If no such process exists, delete the lock file.")
        else:
            raise RuntimeError(f"could not take the lock {self.lock_path} (it keeps reappearing)")
        self._locked = True
        try:
            self._guard()
        except BaseException:
            self.release()
            raise
        return self

    def _create(self, me: dict) -> bool:
        """The lock file appears whole or not at all: written beside it, then hard-linked in
        (a link fails if the name exists). Another trainer never reads a half-written lock,
        which it would take for an unreadable one and take over."""
        tmp = f"{self.lock_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, self.lock_path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        finally:
            os.remove(tmp)

    def _take_over(self, stale: Optional[dict]) -> None:
        """Remove the stale lock `stale` (as read), and only it: it is moved aside first, and
        put back if what was moved is another trainer's newer lock (two trainers found the same
        stale lock; the first took it over and made its own)."""
        aside = f"{self.lock_path}.{os.getpid()}.stale"
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return  # someone else removed it: try to create again
        if _read_lock(aside) != stale:
            try:
                os.link(aside, self.lock_path)  # not the lock we judged: put it back
            except OSError:
                pass
        os.remove(aside)

    def _owner(self) -> Optional[dict]:
        return _read_lock(self.lock_path)

    @staticmethod
    def _stale(owner: dict) -> bool:
        if not owner:  # vanished between open and read: try again
            return True
        return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))

    def _remove_lock(self):
        try:
            os.remove(self.lock_path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self._locked:
            owner = self._owner() or {}
            if owner.get("pid") == os.getpid():
                self._remove_lock()
            self._locked = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # ------------------------------------------------------------------------------- guard
    def existing(self) -> list:
        return [f for f in RUN_FILES if os.path.exists(os.path.join(self.out, f))]

    def _guard(self) -> None:
        found = self.existing()
        if not found or self.resume:
            return
        if self.overwrite:
            for f in found + [f for f in os.listdir(self.out) if f.startswith("trace_rank")]:
                os.remove(os.path.join(self.out, f))
            return
        what = "a finished run" if finished(self.out) else "a run"
        raise RuntimeError(
            f"--out {self.out} already holds {what} ({', '.join(found)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out")

    # --------------------------------------------------------------------------------- log
    def log(self, resume_step: Optional[int] = None) -> "Logger":
        """The JSONL log; on resume, cut back to the records of steps <= resume_step."""
        path = os.path.join(self.out, "log.jsonl")
        if self.enabled and resume_step is not None and os.path.exists(path):
            truncate_log(path, resume_step)
        return Logger(path, self.enabled, append=resume_step is not None)


def finished(out: str) -> bool:
    """Whether the run in `out` has a summary.json that says it finished."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return bool(json.load(f).get("finished"))
    except (OSError, ValueError):
        return False


def truncate_log(path: str, step: int) -> None:
    """Keep the records of steps <= step (and unparseable tails dropped), atomically."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class Logger:
    """JSONL log (rank 0): one line per step and per evaluation."""

    def __init__(self, path, enabled, append):
        self.f = open(path, "a" if append else "w") if enabled else None

    def __call__(self, **rec):
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()
