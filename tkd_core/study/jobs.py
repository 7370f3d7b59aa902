"""Resumable jobs: subprocess scheduling with dependencies, a run directory's state, and the
wall-clock record of every attempt and every invocation.

    status = run_tasks([Task("teacher", argv, log), Task("kd", argv2, log2, deps=("teacher",))],
                       jobs=2)                      # name -> 'ok' | 'failed' | 'skipped'

Nothing here knows about models: a task is a command line and a log file.
"""
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import time
from typing import Callable, List, Optional

import torch

from ..rundir import finished

@dataclasses.dataclass
class Task:
    name: str
    argv: List[str]                 # a subprocess command line
    log: str                        # its stdout + stderr
    deps: tuple = ()                # task names that must succeed first
    on_done: Optional[Callable] = None  # (ok, wall_s, cpu_s) -> None


def _die_with_parent():
    """Child side of Popen: get SIGTERM when the study dies (even by SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_tasks(tasks: List[Task], jobs: int, poll: float = 0.2) -> dict:
    """Run tasks as subprocesses, at most `jobs` at once, in list order as their dependencies
    allow. A failed task fails its dependents (never started). Returns name -> status
    ('ok' | 'failed' | 'skipped'). Child CPU time comes from wait4's rusage."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    names = {t.name for t in tasks}
    for t in tasks:
        missing = [d for d in t.deps if d not in names]
        if missing:
            raise ValueError(f"task {t.name!r} depends on unknown task(s) {missing}")
    status, pending, running = {}, list(tasks), {}
    try:
        while pending or running:
            for t in list(pending):
                if any(status.get(d) in ("failed", "skipped") for d in t.deps):
                    status[t.name] = "skipped"
                    pending.remove(t)
                    os.makedirs(os.path.dirname(t.log), exist_ok=True)
                    with open(t.log, "a") as f:
                        f.write(f"not started: a dependency failed ({t.deps})\n")
                    if t.on_done:
                        t.on_done(False, 0.0, 0.0)
                elif len(running) < jobs and all(status.get(d) == "ok" for d in t.deps):
                    pending.remove(t)
                    os.makedirs(os.path.dirname(t.log), exist_ok=True)
                    f = open(t.log, "a")
                    f.write(f"$ {shlex.join(t.argv)}\n")
                    f.flush()
                    p = subprocess.Popen(t.argv, stdout=f, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
                    running[p.pid] = (t, p, f, time.perf_counter())
            for pid, (t, p, f, t0) in list(running.items()):
                done, wstatus, ru = os.wait4(pid, os.WNOHANG)
                if done == 0:
                    continue
                p.returncode = os.waitstatus_to_exitcode(wstatus)  # reaped here, not by Popen
                f.close()
                del running[pid]
                ok = p.returncode == 0
                status[t.name] = "ok" if ok else "failed"
                if t.on_done:
                    t.on_done(ok, time.perf_counter() - t0, ru.ru_utime + ru.ru_stime)
                if not ok:
                    print(f"[study] {t.name} FAILED (exit {p.returncode}); see {t.log}",
                          flush=True)
            if pending or running:
                time.sleep(poll)
    finally:
        for _, p, f, _ in running.values():  # interrupted: stop the children, keep checkpoints
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            f.close()
    return status


def run_in_process(tasks: List[Task]) -> dict:
    """--jobs 0: the same `tkd_core.train` command lines, one after the other in this process
    (no interpreter start-up per job: the tests' tiny studies)."""
    from .. import train
    status, threads = {}, torch.get_num_threads()
    for t in tasks:
        if any(status.get(d) != "ok" for d in t.deps):
            status[t.name] = "skipped"
            if t.on_done:
                t.on_done(False, 0.0, 0.0)
            continue
        os.makedirs(os.path.dirname(t.log), exist_ok=True)
        w0, c0 = time.perf_counter(), time.process_time()
        with open(t.log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"$ {shlex.join(t.argv)}", flush=True)
            try:
                code = train.main(t.argv[3:])  # drop `python -m tkd_core.train`
            except Exception as e:  # a crash fails this job, not the study
                print(f"error: {type(e).__name__}: {e}")
                code = 1
        torch.set_num_threads(threads)
        status[t.name] = "ok" if code == 0 else "failed"
        if code != 0:
            print(f"[study] {t.name} FAILED; see {t.log}", flush=True)
        if t.on_done:
            t.on_done(code == 0, time.perf_counter() - w0, time.process_time() - c0)
    return status


def run_state(run_dir: str) -> str:
    """'done' (finished summary), 'partial' (a checkpoint to resume from) or 'new'."""
    if finished(run_dir):
        return "done"
    return "partial" if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) else "new"


def times_path(run_dir):
    return os.path.join(run_dir, "study_time.json")


def record_attempt(run_dir, wall, cpu, resumed, ok):
    path = times_path(run_dir)
    attempts = read_attempts(run_dir)
    attempts.append(dict(wall_s=wall, cpu_s=cpu, resumed=resumed, ok=ok))
    with open(path, "w") as f:
        json.dump(attempts, f, indent=1)


def read_attempts(run_dir):
    try:
        with open(times_path(run_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


class Invocations:
    """<out>/invocations.json: every invocation of the study and its wall time so far, updated
    whenever a job ends, so a killed invocation still counts (up to its last finished job)."""

    def __init__(self, out: str, command: str):
        self.path, self.t0 = os.path.join(out, "invocations.json"), time.perf_counter()
        try:
            with open(self.path) as f:
                self.runs = json.load(f)
        except (OSError, ValueError):
            self.runs = []
        self.runs.append(dict(command=command, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                              wall_s=0.0, completed=False))
        self.tick()

    def tick(self, completed: bool = False) -> None:
        self.runs[-1].update(wall_s=time.perf_counter() - self.t0, completed=completed)
        with open(self.path, "w") as f:
            json.dump(self.runs, f, indent=1)

    @property
    def total_s(self) -> float:
        return sum(r["wall_s"] for r in self.runs)
