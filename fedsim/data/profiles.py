"""Per-client profiles: one file for everything that differs between clients' devices.

A profile file (`client.profile`, YAML or JSON) describes clients by device class, with per-client
exceptions; clients it does not mention take `default`:

    classes:
      phone:  {availability: 0.3, lora_rank: 2, speed: 0.2, bandwidth_mbps: 5, dropout: 0.2}
      laptop: {availability: 0.7, lora_rank: 4, speed: 1.0}
    default: laptop                 # a class name or a mapping
    clients:
      0: phone
      7: {class: phone, lora_rank: 1}

Fields left out fall back to the config: `server.availability` for availability, `model.lora.r`
for the rank, and the `system` section's distributions for speed, bandwidth and dropout (which
only matter when `system.enabled` is true).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsim.errors import FedsimInputError


@dataclass(frozen=True)
class ClientProfile:
    """One client's device; None means "use the config's default or distribution"."""

    availability: float | None = None
    """Probability the client is available in a round (selection `availability`)."""
    lora_rank: int | None = None
    """LoRA rank it trains (at most model.lora.r)."""
    speed: float | None = None
    """Relative compute speed, 1 = the reference device (system model)."""
    bandwidth_mbps: float | None = None
    """Link bandwidth in megabits per second (system model)."""
    dropout: float | None = None
    """Probability it drops out of a round it was sampled for (system model)."""

    def over(self, default: ClientProfile) -> ClientProfile:
        """This profile, with `default`'s value wherever this one has none."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(default, **{k: v for k, v in own.items() if v is not None})


FIELDS = tuple(f.name for f in dataclasses.fields(ClientProfile))


def _number(values: dict[str, Any], key: str, where: str, low: float, high: float | None) -> Any:
    """values[key] as a float checked against low (exclusive for 0-bounded rates) and high."""
    value = values.get(key)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok and high is not None:
        ok = low <= value <= high
    elif ok:
        ok = value > low
    if not ok:
        expected = f"a value in [{low:g}, {high:g}]" if high is not None else f"a number > {low:g}"
        raise FedsimInputError(f"{where}.{key}: expected {expected}, got {value!r}")
    return float(value)


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
    rank = values.get("lora_rank")
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank
    ):
        raise FedsimInputError(
            f"{where}.lora_rank: expected an integer in 1..{max_rank} (model.lora.r), got {rank!r}"
        )
    return ClientProfile(
        availability=_number(values, "availability", where, 0, 1),
        lora_rank=rank,
        speed=_number(values, "speed", where, 0, None),
        bandwidth_mbps=_number(values, "bandwidth_mbps", where, 0, None),
        dropout=_number(values, "dropout", where, 0, 1),
    )


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
        profiles[cid] = _entry(entry, classes, f"{path}: clients.{key}", max_rank).over(default)
    return profiles
