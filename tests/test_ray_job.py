"""`ray job submit` against a real head started with `ray start --head`, token authentication on,
as the README shows it: the quickstart runs as a job, a job without the token is refused, and a
stopped job resumes.

The token lives in ~/.ray/auth_token of a HOME inside the test's folder, so the user's own token
is never read or overwritten.
"""

import subprocess
import time
from pathlib import Path

import pytest
from ray._private.authentication.authentication_token_generator import (
    generate_new_authentication_token,
)

from tests.ray_cluster import RAY, LocalRayCluster, token_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[1]
QUICK = ["--set", "client.local_steps=2", "--set", "server.clients_per_round=2"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(generate_new_authentication_token())
    cluster = LocalRayCluster(root, token_env(home, None))
    try:
        cluster.start_head(num_cpus=2, resources={}, dashboard=True)
        yield cluster, root
    finally:
        cluster.stop()


def ray_job(cluster, *args: str, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args[:1], "--address", cluster.dashboard_url, *args[1:]],
        env=env or cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(cluster, *fedsim_args: str, env=None, wait: bool = True, job_id: str | None = None):
    options = ["--working-dir", ".", "--runtime-env", "runtime_env.yaml"]
    if job_id:
        options += ["--submission-id", job_id]
    if not wait:
        options.append("--no-wait")
    return ray_job(cluster, "submit", *options, "--", "fedsim", "run", *fedsim_args, env=env)


def test_quickstart_runs_as_a_job(head):
    cluster, root = head
    out = root / "runs"
    done = submit(
        cluster,
        "experiments/quickstart.yaml",
        *QUICK,
        "--set",
        "run.rounds=2",
        "--set",
        f"run.output_dir={out}",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "round   2/2" in done.stdout
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert (out / "quickstart" / "latest").read_text().strip() == "round_0002"


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
def test_a_job_without_the_token_is_refused(head, tmp_path, token):
    cluster, root = head
    env = token_env(tmp_path / "stranger", token)  # an empty HOME: no ~/.ray/auth_token
    done = submit(
        cluster, "experiments/quickstart.yaml", "--set", f"run.output_dir={root}/x", env=env
    )
    assert done.returncode != 0
    said = (done.stdout + done.stderr).lower()
    assert "token" in said or "401" in said or "unauthorized" in said, said[-2000:]
    assert not (root / "x").exists()


def test_a_stopped_job_resumes(head):
    cluster, root = head
    out = root / "resumed"
    args = ["experiments/quickstart.yaml", *QUICK, "--set", f"run.output_dir={out}"]
    started = submit(cluster, *args, "--set", "run.rounds=30", wait=False, job_id="fedsim-a")
    assert started.returncode == 0, started.stderr
    latest = out / "quickstart" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert time.monotonic() < deadline, ray_job(cluster, "logs", "fedsim-a").stdout[-3000:]
        time.sleep(1)
    stopped = ray_job(cluster, "stop", "fedsim-a")
    assert stopped.returncode == 0, stopped.stderr
    status = ray_job(cluster, "status", "fedsim-a")
    assert "was stopped" in status.stdout + status.stderr
    done_rounds = int(latest.read_text().strip().removeprefix("round_"))
    assert done_rounds < 30

    resumed = submit(cluster, *args, "--set", f"run.rounds={done_rounds + 1}", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resuming {out / 'quickstart'}" in resumed.stdout
    assert latest.read_text().strip() == f"round_{done_rounds + 1:04d}"
