"""Run a model server's engine, and stop it when the replica that started it is gone.

    python -m serving.engine_guard ENGINE-COMMAND...

A Ray replica that is killed (SIGKILL, its node lost, a failed health check) runs no clean-up
of its own, and an engine left behind keeps its port, its memory and its GPUs. The engine runs
in a process group of its own (vLLM's API server, its engine core and its workers: they all
stay in it), and two processes stop that group:
- this guard, the replica's child and the engine's parent: when the replica goes (the guard
  is handed to another parent) or when it is asked to stop (SIGTERM), it stops the group and
  exits with the engine's status. The replica watches the engine through it.
- a watcher, which the guard leaves behind as an orphan, out of reach of Ray: a worker that
  exits kills its own children (the guard) with SIGKILL, and the kernel's death signal then
  stops the API server only, not the engine core and workers it started. The watcher stops
  the group as soon as the replica or the guard is gone, and exits once the group is empty.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM to the engine's group (vLLM stops its engine core and workers), then SIGKILL to
    whatever of it is left after the grace period."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()  # reap it, or its zombie keeps the group alive
            if not group_alive(pgid):
                return
            if leader is not None and leader.returncode is not None:
                break  # the leader is gone: none of its group may keep the port or the GPUs
            time.sleep(0.1)


def watch(pgid: int, replica: int, guard: int) -> None:
    """The watcher's life: stop the engine's group once the replica or the guard is gone."""
    try:
        # pidfds, not pids: a pid reused by another process must not look like the replica.
        fds = [os.pidfd_open(replica), os.pidfd_open(guard)]
    except ProcessLookupError:
        fds = []
    while group_alive(pgid):
        if not fds or select.select(fds, [], [], POLL_S)[0]:
            time.sleep(POLL_S)  # the guard stops the group itself when it can: let it
            stop_group(pgid)
            return


def start_watcher(pgid: int, replica: int) -> None:
    guard = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:  # the watcher: its parent exits now, and it is an orphan
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                watch(pgid, replica, guard)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def _die_with_guard() -> None:
    # Runs in the engine's process before it executes: SIGKILL when its parent (this guard,
    # single-threaded, so the thread that forked lives as long as the guard) dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    replica = os.getppid()
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_guard)
    start_watcher(proc.pid, replica)

    def on_signal(signum, frame):
        stop_group(proc.pid, proc)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while proc.poll() is None:
        if os.getppid() != replica:
            print(
                f"engine_guard: the replica (pid {replica}) is gone: stopping the engine",
                flush=True,
            )
            stop_group(proc.pid, proc)
            return 1
        time.sleep(POLL_S)
    # The API server is gone; its engine core and workers must not outlive it.
    stop_group(proc.pid)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
