"""fedsim's imports point one way: cli -> driver -> execution/server/client -> data/model ->
config. Client and server code never import each other (what crosses between them lives in
fedsim/protocol.py), and evaluation never imports the driver. Imports inside functions count."""

import ast
import sys
from pathlib import Path

import fedsim

PACKAGE = Path(fedsim.__file__).parent

LAYERS = {
    "errors": 0,
    "deepspeed_config": 1,
    "config": 2,
    "seeds": 3,
    "rundir": 3,
    "resources": 3,
    "faults": 3,
    "tb": 3,
    "compression": 3,
    "lora_ranks": 3,
    "ray_auth": 3,
    "console": 3,
    "round_record": 3,
    "baselines": 3,
    "checkpoint": 4,
    "tracking": 4,
    "protocol": 4,
    "model": 4,
    "model_files": 4,
    "data": 4,
    "client": 5,
    "server": 5,
    "execution": 6,
    "actors": 6,
    "prepare": 7,
    "driver": 8,
    "async_rounds": 8,
    "eval": 8,
    "report": 8,
    "runs": 8,
    "config_docs": 8,
    "cli": 9,
}
"""A unit may import units of lower layers, and of its own layer only as listed below."""
ALLOWED_SIDEWAYS = {
    ("checkpoint", "rundir"),
    ("data", "checkpoint"),
    ("protocol", "compression"),
    ("protocol", "lora_ranks"),
    # model_files reads the model's files without torch and leaves the rest to model
    ("model_files", "model"),
    ("model", "model_files"),
    ("execution", "actors"),  # the pool starts the ClientWorker actors
    ("runs", "report"),  # the runs table reads a run as the report does (report.load_run)
    (
        "driver",
        "eval",
    ),  # the per-round held-out probe (fedsim.eval.probe); eval never imports driver
    # server.mode async: the driver hands its RoundRunner to the asynchronous step loop, which
    # reuses the round's parts (aggregator, pool, checkpoints, commits)
    ("driver", "async_rounds"),
    ("async_rounds", "driver"),
}


def unit(module: str) -> str:
    """The layering unit of a dotted module name: a subpackage, or a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedsim"


def imports() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every fedsim import in the package."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "fedsim":
                    targets = [f"fedsim.{a.name}" for a in node.names]
                elif node.module.startswith("fedsim."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("fedsim.")]
            for target in targets:
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                found.add((source, unit(target), where))
    return found


def test_every_unit_has_a_layer():
    units = {unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts))
             for p in PACKAGE.rglob("*.py")}  # fmt: skip
    assert units - {"fedsim", "__init__", "__main__"} <= set(LAYERS)


def _points_down(src: str, dst: str) -> bool:
    if LAYERS[dst] == LAYERS[src]:
        return (src, dst) in ALLOWED_SIDEWAYS
    return LAYERS[dst] < LAYERS[src]


def test_imports_point_down():
    wrong = sorted(
        f"{where}: {src} -> {dst}"
        for src, dst, where in imports()
        if src != dst and not _points_down(src, dst)
    )
    assert wrong == []


def test_client_and_server_never_import_each_other():
    crossing = sorted(
        f"{where}: {src} -> {dst}"
        for src, dst, where in imports()
        if {src, dst} == {"client", "server"}
    )
    assert crossing == []


def test_evaluation_does_not_import_the_driver():
    assert [w for src, dst, w in imports() if src == "eval" and dst == "driver"] == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The scan is not vacuous: a config module importing the driver is caught."""
    fake = tmp_path / "fedsim"
    (fake / "server").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("def f():\n    from fedsim.driver import run_experiment\n")
    (fake / "server" / "x.py").write_text("from fedsim.client.worker import ClientTask\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = imports()
    assert ("config", "driver", "fedsim/config.py:2") in found
    assert ("server", "client", "fedsim/server/x.py:1") in found
