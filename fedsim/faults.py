"""Fault injection for fedsim's own failure tests (unset in normal use).

`FEDSIM_FAULTS` holds a JSON list of faults, each naming a round and where it strikes:

    {"round": 2, "client": 3}                              client 3 raises inside its turn
    {"round": 2, "hold": PATH}                             every client of round 2 creates PATH
                                                           and then waits until it is killed, so
                                                           a test can act mid-round on an event
                                                           (PATH exists), not after a sleep
    {"round": 2, "aggregator": "exit_before_checkpoint"}   the aggregator process exits 0.5 s
                                                           into writing round 2's checkpoint
                                                           (in the background, as round 3 starts)

A fault with `"once_file": PATH` strikes only where it can create PATH, so it strikes once even
in the fresh actor that replaces the one it ended. The driver forwards the variable to the actors
it starts only when it is set.
"""

from __future__ import annotations

import json
import os
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
        if fault.get("round") == round_idx and "hold" in fault:
            Path(fault["hold"]).touch()
            while True:  # the round never completes: the test kills the run meanwhile
                time.sleep(1)
        if (fault.get("round"), fault.get("client")) == (round_idx, client_id) and _strikes(fault):
            raise RuntimeError(f"injected fault ({FAULTS_ENV}) for client {client_id}")


def exit_if_aggregator_fault(round_idx: int, where: str) -> None:
    """End this process at once (as a crash would) if a fault is injected here."""
    for fault in injected_faults():
        if (fault.get("round"), fault.get("aggregator")) == (round_idx, where) and _strikes(fault):
            time.sleep(0.5)  # long enough for the driver to start the next round
            os._exit(1)
