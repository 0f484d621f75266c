"""Several hosts on this machine: network namespaces joined by a bridge, each with an address
of its own (10.231.0.0/24). The test process reaches them over the bridge (10.231.0.254).

    with TestHosts(["head", "worker"]) as hosts:
        hosts.ip("head")                       # 10.231.0.1
        hosts.popen("worker", argv, env=...)   # a process on that host
        hosts.kill_all("worker")               # SIGKILL every process on it: the host is lost

Needs root and iproute2. Everything made here is removed on exit, processes first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

SUBNET = "10.231.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class TestHosts:
    __test__ = False  # not a test class

    def __init__(self, names: list[str]) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"lsb{tag}"
        self.names = names
        self.netns = {name: f"llmship-{tag}-{name}" for name in names}
        self.procs: dict[str, list[subprocess.Popen]] = {name: [] for name in names}

    def ip(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def __enter__(self) -> TestHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                ns, veth = self.netns[name], f"{self.bridge}v{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def command(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns[name], *argv]

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(name, argv), start_new_session=True, **kwargs)
        self.procs[name].append(proc)
        return proc

    def run(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, argv), **kwargs)

    def pids(self, name: str) -> list[int]:
        out = _ip("netns", "pids", self.netns[name], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, name: str) -> list[int]:
        """SIGKILL every process in the host's namespace (as a power cut would end them)."""
        killed = []
        for _ in range(50):  # bounded: processes may fork while we kill
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for proc in self.procs[name]:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs[name] = []
        return killed

    def __exit__(self, *exc) -> None:
        for name in self.names:
            self.kill_all(name)
            _ip("netns", "del", self.netns[name], check=False)
        _ip("link", "del", self.bridge, check=False)
