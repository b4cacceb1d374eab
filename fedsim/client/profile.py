"""Per-client profiles: each client's availability probability and LoRA rank.

A profile file (`client.profile`, YAML or JSON) describes clients by device class, with per-client
exceptions; clients it does not mention take `default`:

    classes:
      phone:  {availability: 0.3, lora_rank: 2}
      laptop: {availability: 0.7, lora_rank: 4}
    default: laptop                 # a class name or a mapping
    clients:
      0: phone
      7: {class: phone, lora_rank: 1}

Fields left out fall back to the config: `server.availability` for availability, `model.lora.r`
for the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsim.errors import FedsimInputError

FIELDS = ("availability", "lora_rank")


@dataclass(frozen=True)
class ClientProfile:
    availability: float | None = None
    lora_rank: int | None = None


def _entry(
    raw: Any, classes: dict[str, dict[str, Any]], where: str, max_rank: int
) -> ClientProfile:
    if isinstance(raw, str):
        if raw not in classes:
            raise FedsimInputError(f"{where}: unknown class {raw!r}; classes: {sorted(classes)}")
        raw = {"class": raw}
    if not isinstance(raw, dict):
        raise FedsimInputError(f"{where}: expected a class name or a mapping, got {raw!r}")
    values: dict[str, Any] = {}
    if "class" in raw:
        if raw["class"] not in classes:
            raise FedsimInputError(f"{where}.class: unknown class {raw['class']!r}")
        values.update(classes[raw["class"]])
    unknown = set(raw) - {*FIELDS, "class"}
    if unknown:
        raise FedsimInputError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected {FIELDS}")
    values.update({k: v for k, v in raw.items() if k != "class"})
    availability, rank = values.get("availability"), values.get("lora_rank")
    if availability is not None and (
        isinstance(availability, bool)
        or not isinstance(availability, int | float)
        or not 0 <= availability <= 1
    ):
        raise FedsimInputError(
            f"{where}.availability: expected a value in [0, 1], got {availability!r}"
        )
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank
    ):
        raise FedsimInputError(
            f"{where}.lora_rank: expected an integer in 1..{max_rank} (model.lora.r), got {rank!r}"
        )
    return ClientProfile(None if availability is None else float(availability), rank)


def load_profiles(path: str | Path, num_clients: int, max_rank: int) -> list[ClientProfile]:
    """One `ClientProfile` per registered client; raises FedsimInputError naming the entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FedsimInputError(f"client.profile: {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise FedsimInputError(f"client.profile: cannot read {path} ({err})") from None
    if not isinstance(raw, dict) or set(raw) - {"classes", "default", "clients"}:
        raise FedsimInputError(f"{path}: expected a mapping with classes, default and clients")
    classes = raw.get("classes") or {}
    if not isinstance(classes, dict):
        raise FedsimInputError(f"{path}: classes: expected a mapping of class name to fields")
    for name, fields in classes.items():
        _entry(fields, {}, f"{path}: classes.{name}", max_rank)  # validates the class itself
    default = _entry(raw.get("default") or {}, classes, f"{path}: default", max_rank)
    clients = raw.get("clients") or {}
    if not isinstance(clients, dict):
        raise FedsimInputError(f"{path}: clients: expected a mapping of client id to a profile")
    profiles = [default] * num_clients
    for key, entry in clients.items():
        try:
            cid = int(key)
        except (TypeError, ValueError):
            raise FedsimInputError(
                f"{path}: clients.{key}: expected an integer client id"
            ) from None
        if not 0 <= cid < num_clients:
            raise FedsimInputError(
                f"{path}: clients.{key}: no such client (data.num_clients is {num_clients})"
            )
        own = _entry(entry, classes, f"{path}: clients.{key}", max_rank)
        profiles[cid] = ClientProfile(
            own.availability if own.availability is not None else default.availability,
            own.lora_rank if own.lora_rank is not None else default.lora_rank,
        )
    return profiles
