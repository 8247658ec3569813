"""Ray nodes started with `ray start` for a test, in its own temp dir and home; stopping ends only their processes
(not Ray's own stop command, which would end every Ray process of the user on the machine, a running benchmark
included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


class RayCluster:
    """Head and worker nodes on 127.0.0.1 with a home (~/.ray/auth_token) under `root` and a temp dir of their own."""

    def __init__(self, root: Path, env: dict[str, str], port: int) -> None:
        self.root, self.port = root, port
        # Every process of these nodes names this folder on its command line. A short path of its own: Ray's
        # socket paths inside it must stay under 108 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # it forbids nodes
        self.env["HOME"] = str(root / "home")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ray(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*RAY, *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result

    def start_head(self, *extra: str) -> None:
        self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={self.temp}",
                 "--disable-usage-stats", *extra)

    def start_worker(self, *extra: str) -> None:
        self.ray("start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
                 *extra)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir, and their children (Ray's worker processes)."""
        own: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in arg for arg in p.info["cmdline"] or ()):
                own[p.pid] = p
                for child in _children(p):
                    own[child.pid] = child
        return list(own.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=15)
        shutil.rmtree(self.temp, ignore_errors=True)


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
