"""Ray token authentication: on for every Ray instance fedsim starts or attaches to.

A Ray cluster without authentication runs whatever code anyone who can reach its ports sends it.
fedsim therefore sets `RAY_AUTH_MODE=token` itself (rather than relying on Ray's default, which
has changed between releases) before it starts a local instance or attaches to a cluster, and
before attaching it asks the cluster, from a process that holds no token, whether it answers
without one. If it does, the run is refused (exit 2) unless `cluster.allow_unauthenticated` says
the user knowingly accepts that.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

from fedsim.errors import FedsimInputError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
PROBE_TIMEOUT_S = 30.0

# Run in a child process whose environment has no token and token auth off: the GCS answers a
# key-value listing only if it does not check tokens.
_PROBE = """
import sys
from ray._private.services import canonicalize_bootstrap_address
from ray._raylet import GcsClient
try:
    GcsClient(address=canonicalize_bootstrap_address(sys.argv[1])).internal_kv_keys(
        b"", None, timeout=10
    )
except Exception as err:
    text = str(err).lower()
    sys.exit(3 if "auth" in text or "token" in text else 4)
"""
ANSWERS, REFUSES, UNKNOWN = "answers", "refuses", "unknown"


def require_token_auth() -> None:
    """Turn Ray's token authentication on for this process and the Ray processes it starts.

    Ray reads RAY_AUTH_MODE once into its cached config when it is imported; without refreshing
    that cache, a mode of `disabled` inherited from the environment would stay in force here
    (no token is generated) while the GCS it starts reads `token` and aborts.
    """
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # as ray.init does when it turns token auth on by default


def unauthenticated_access(address: str) -> str:
    """Whether the Ray cluster at `address` answers a client that holds no token: `answers`,
    `refuses`, or `unknown` (unreachable, or an address the probe cannot use)."""
    if not _reachable(address):
        return UNKNOWN
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    with tempfile.TemporaryDirectory() as home:  # no ~/.ray/auth_token to fall back on
        env.update(HOME=home, RAY_AUTH_MODE="disabled")
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _PROBE, address],
                env=env,
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return UNKNOWN
    return {0: ANSWERS, 3: REFUSES}.get(probe.returncode, UNKNOWN)


def _reachable(address: str) -> bool:
    """False when `address` is host:port and nothing accepts a connection there (Ray's client
    would retry for many seconds before giving up); True otherwise, e.g. for `auto`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return True
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError:
        return False
    return True


def check_cluster(address: str, allow_unauthenticated: bool) -> None:
    """Refuse (FedsimInputError) to attach to a cluster that runs code for anyone."""
    if address.startswith("ray://") or allow_unauthenticated:
        return  # Ray Client addresses are served by a proxy the probe cannot query
    if unauthenticated_access(address) == ANSWERS:
        raise FedsimInputError(
            f"cluster.address: the Ray cluster at {address} accepts requests without a token "
            "(token authentication is off), so anyone who reaches it can run code there; "
            "start it with RAY_AUTH_MODE=token, or set cluster.allow_unauthenticated: true "
            "to use it anyway"
        )
