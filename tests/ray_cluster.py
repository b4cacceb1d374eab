"""Real Ray clusters for the integration tests: `ray start --head` and `ray start --address`,
as a user starts them, with token authentication on.

Every port is picked free, the temp dir is the test's own, and `stop()` ends exactly the nodes
this helper started: each `ray start --block` process is terminated (which shuts its node down),
then any process left behind whose command line names this cluster's own temp dir is killed by
its pid. `ray stop` is never used: it would stop every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started"


WORKER_PORTS = 200
"""Size of each node's worker-port range."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A head node and worker nodes on this machine, each a `ray start --block` child process."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        # Unix socket paths must stay short: the temp dir is not under pytest's long tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fsr-", dir="/tmp"))
        self.root = root
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self._taken = {self.gcs_port, self.dashboard_port}
        """Every port this cluster's nodes were given: no worker-port range may cover one."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        """Explicit free ports for every listening service, so clusters of other tests and
        users on this machine never collide with this one."""
        # Ray refuses to start when one of its ports falls inside the worker-port range (it
        # happened: the GCS port drawn inside it), so the range and the ports stay apart.
        low = free_port()
        while low + WORKER_PORTS > 65535 or any(
            low <= p <= low + WORKER_PORTS for p in self._taken
        ):
            low = free_port()
        self._taken.update(range(low, low + WORKER_PORTS + 1))

        def port() -> int:
            while (p := free_port()) in self._taken:
                pass
            self._taken.add(p)
            return p

        return [
            f"--node-manager-port={port()}",
            f"--object-manager-port={port()}",
            f"--metrics-export-port={port()}",
            f"--dashboard-agent-listen-port={port()}",
            f"--dashboard-agent-grpc-port={port()}",
            f"--runtime-env-agent-port={port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + WORKER_PORTS}",
        ]

    def _start(self, name: str, args: list[str], wrap: list[str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [RAY, "start", "--block", "--disable-usage-stats", *args, *self._ports()]
        proc = subprocess.Popen(
            [*(wrap or []), *cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 180
        while STARTED not in (self.root / f"{name}.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n" + self.log(name))
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-4000:]

    def start_head(self, num_cpus: int, resources: dict[str, float], dashboard: bool) -> None:
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--ray-client-server-port={free_port()}",
            "--num-gpus=0",
        ]
        if dashboard:
            args += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            args.append("--include-dashboard=false")
        self._start("head", args)

    def add_node(
        self, name: str, num_cpus: int, resources: dict[str, float], hide: Path | None = None
    ) -> None:
        """A worker node joining the head. With `hide`, the node runs in a private mount
        namespace where `hide` is an empty tmpfs: its processes cannot see what the driver
        writes there, as on a machine that shares no filesystem with the head."""
        wrap = None
        args = [
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            "--num-gpus=0",
        ]
        if hide is not None:
            script = f'mount -t tmpfs fedsim-hidden "{hide}" && exec "$@"'
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        self._start(name, args, wrap)

    def nodes(self) -> list[dict]:
        """`ray.nodes()` of this cluster, read by a short-lived driver."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], "
            "'resources': n['Resources']} for n in ray.nodes()]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """End the nodes this cluster started, and nothing else."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self._kill_leftovers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Processes of this cluster that outlived their node (matched by its unique temp dir),
        each killed by pid."""
        import psutil

        marker = str(self.temp_dir)
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if marker in cmdline and proc.info["pid"] != me:
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def can_hide_paths() -> bool:
    """Whether this machine lets us give a node a private mount namespace (root and unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def token_env(home: Path, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of a shell with Ray's token auth on, HOME in the test's own folder (so
    ~/.ray/auth_token is the test's, never the user's) and the venv's tools on PATH. The token
    is given in RAY_AUTH_TOKEN, or (None) left to ~/.ray/auth_token under that HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        RAY_AUTH_MODE="token",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    env.update(extra)
    return env
