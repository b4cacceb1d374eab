"""The Ray actors are shells over the real ClientWorker and Aggregator (fedsim/actors.py): every
public method of a real class has a forwarder of the same parameters, and importing the shells
(or the driver) imports no torch."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from fedsim import actors
from fedsim.client.worker import ClientWorker
from fedsim.server.aggregator import Aggregator


def _methods(cls: type) -> dict[str, list[str]]:
    """Public methods (not properties) and their parameter names (less the one `ray.remote`
    adds for tracing)."""
    return {
        name: [p for p in inspect.signature(member).parameters if p != "_ray_trace_ctx"]
        for name, member in vars(cls).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("shell", "real"), [(actors.ClientWorker, ClientWorker), (actors.Aggregator, Aggregator)]
)
def test_every_public_method_has_a_forwarder_with_its_parameters(shell: type, real: type) -> None:
    assert _methods(shell) == _methods(real)
    init = [p for p in inspect.signature(shell.__init__).parameters if p != "_ray_trace_ctx"]
    assert init == list(inspect.signature(real.__init__).parameters)


def test_the_driver_and_the_shells_import_no_torch() -> None:
    code = (
        "import sys, fedsim.actors, fedsim.driver, fedsim.async_rounds, fedsim.cli; "
        "print(sorted({'torch', 'transformers', 'peft', 'deepspeed'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
