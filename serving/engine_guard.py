"""Run a model server's engine, and stop it when the replica that started it is gone.

    python -m serving.engine_guard ENGINE-COMMAND...

A Ray replica that is killed (SIGKILL, its node lost, a failed health check) runs no clean-up
of its own, and an engine left behind keeps its port and its GPUs. This guard is the replica's
child, in a session of its own (out of reach of a signal to the replica's process group), and
the engine's parent: when the replica goes (the guard is handed to another parent), or when it
is asked to stop (SIGTERM), it stops the engine's whole process group (vLLM runs its engine
core in a process of its own), then exits with the engine's status. Should the guard itself
be killed, the kernel kills the engine (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
STOP_GRACE_S = 10.0


def stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                # The leader is gone: nothing of its group may keep the port or the GPUs.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.1)


PR_SET_PDEATHSIG = 1


def _die_with_guard() -> None:
    # Runs in the engine's process before it executes: SIGKILL when its parent (this guard,
    # single-threaded, so the thread that forked lives as long as the guard) dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_guard)

    def on_signal(signum, frame):
        stop(proc)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while proc.poll() is None:
        if os.getppid() != parent:
            print(f"engine_guard: the replica (pid {parent}) is gone: stopping the engine",
                  flush=True)
            stop(proc)
            return 1
        time.sleep(POLL_S)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
