"""Fault injection for fedsim's own failure tests (unset in normal use).

`FEDSIM_FAULTS` holds a JSON list of faults, each naming a round and where it strikes:

    {"round": 2, "client": 3}                              client 3 raises inside its turn
    {"round": 2, "hold": PATH}                             a client of round 2 writes its
                                                           worker's pid to PATH and waits there
                                                           until PATH is removed (or it is
                                                           killed), so a test acts mid-round on
                                                           an event (PATH exists), not after a
                                                           sleep; every client holds unless
                                                           `once_file` is given
    {"round": 2, "aggregator": "exit_before_checkpoint"}   the aggregator process exits before
                                                           writing round 2's checkpoint, once the
                                                           driver has moved on (round 3 begun, or
                                                           the run flushing): round 2 then exists
                                                           only in the process that died
    {"round": 3, "aggregator": "exit_in_client_context"}   the aggregator process exits when
                                                           asked for a round-3 client's context:
                                                           every client task of round 3 then
                                                           has an input that cannot be computed

A fault with `"once_file": PATH` strikes only where it can create PATH, so it strikes once even
in the fresh actor that replaces the one it ended. The driver forwards the variable to the actors
it starts only when it is set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

FAULTS_ENV = "FEDSIM_FAULTS"


def injected_faults() -> list[dict[str, Any]]:
    """The faults listed in FEDSIM_FAULTS (none when unset)."""
    return json.loads(os.environ.get(FAULTS_ENV) or "[]")


def _strikes(fault: dict[str, Any]) -> bool:
    once = fault.get("once_file")
    if once is None:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def forwarded_env() -> dict[str, Any]:
    """Ray actor options that pass FEDSIM_FAULTS on to the actor, when it is set."""
    if not os.environ.get(FAULTS_ENV):
        return {}
    return {"runtime_env": {"env_vars": {FAULTS_ENV: os.environ[FAULTS_ENV]}}}


def raise_client_fault(round_idx: int, client_id: int) -> None:
    """Raise if a fault is injected for this client in this round (or hold, see the module)."""
    for fault in injected_faults():
        if fault.get("round") == round_idx and "hold" in fault and _strikes(fault):
            _hold(Path(fault["hold"]))
        if (fault.get("round"), fault.get("client")) == (round_idx, client_id) and _strikes(fault):
            raise RuntimeError(f"injected fault ({FAULTS_ENV}) for client {client_id}")


def _hold(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)  # the test reads a whole pid or nothing
    while path.exists():  # until the test releases it, or kills this process or the run
        time.sleep(0.05)


_progress = threading.Condition()
_events: set[str] = set()


def note(event: str) -> None:
    """Record that this process reached `event` (see `exit_if_aggregator_fault`)."""
    with _progress:
        _events.add(event)
        _progress.notify_all()


def _wait_for_any(events: set[str], timeout: float) -> None:
    with _progress:
        _progress.wait_for(lambda: bool(events & _events), timeout=timeout)


def exit_if_aggregator_fault(round_idx: int, where: str) -> None:
    """End this process at once (as a crash would) if a fault is injected here: after the driver
    has begun the next round or started flushing (the aggregator `note`s both), so the lost
    round is always one the driver believed handed over. A round written in line never sees
    that, and exits after at most 30 s. Anywhere else it exits at once."""
    for fault in injected_faults():
        if (fault.get("round"), fault.get("aggregator")) == (round_idx, where) and _strikes(fault):
            if where == "exit_before_checkpoint":
                _wait_for_any({f"begin_round {round_idx + 1}", "flush"}, timeout=30)
            os._exit(1)
