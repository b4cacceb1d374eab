"""Partitioners: split the training records among virtual clients, one small class per scheme.

A partitioner sees only the records' categories (the label that makes data heterogeneous) and
returns, per client, the sorted positions of its records. Every record lands in exactly one client
and no client is left empty; a split that cannot satisfy that raises `FedsimInputError`.
`SplitFile` is the exception: it reads a fixed split (source line numbers) from a JSON file.
"""

import json
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsim.config import PartitionKind
from fedsim.errors import FedsimInputError


class Partitioner(ABC):
    """Splits record positions 0..len(categories)-1 among `num_clients` clients."""

    kind: str = ""

    @abstractmethod
    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Per client, a sorted int64 array of record positions; together a partition of all."""


class IID(Partitioner):
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""

    kind = "iid"

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        _check_counts(self.kind, len(categories), num_clients)
        order = rng.permutation(len(categories))
        return _finish(self.kind, np.array_split(order, num_clients))


class Dirichlet(Partitioner):
    """Label-skewed split: each category is spread over clients with Dir(alpha) proportions.

    The NIID-Bench algorithm used by the Shepherd reference code (`client_data_allocation.py`):
    per category (in sorted order), shuffle its records, draw proportions ~ Dir(alpha), give no
    more to clients already holding N/num_clients records, and cut by the cumulative sum; redraw
    everything until each client has at least `min_size` records. Small alpha means more skew.
    """

    kind = "dirichlet"

    def __init__(self, alpha: float, min_size: int = 1, max_attempts: int = 1000) -> None:
        if not alpha > 0:
            raise FedsimInputError(f"data.partition.alpha: must be > 0, got {alpha}")
        if min_size < 1:
            raise FedsimInputError(f"data.partition.min_size: must be >= 1, got {min_size}")
        if max_attempts < 1:
            raise FedsimInputError(f"data.partition: max_attempts must be >= 1, got {max_attempts}")
        self.alpha = alpha
        self.min_size = min_size
        self.max_attempts = max_attempts

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        n = len(categories)
        _check_counts(self.kind, n, num_clients)
        if num_clients * self.min_size > n:
            raise FedsimInputError(
                f"data.partition: {num_clients} clients x min_size={self.min_size} needs "
                f"{num_clients * self.min_size} records but there are {n}; lower "
                "data.partition.min_size or data.num_clients"
            )
        groups = _category_groups(categories)
        cap = n / num_clients
        open_share = np.full(num_clients, self.alpha)
        owner = np.empty(n, dtype=np.int64)
        fewest_short = num_clients
        # Each attempt is a few whole-array operations per category (no per-client Python work),
        # so even the full `max_attempts` at 10,000 clients ends in seconds.
        for _ in range(self.max_attempts):
            sizes = np.zeros(num_clients, dtype=np.int64)
            for members in groups.values():
                members = rng.permutation(members)
                proportions = rng.dirichlet(open_share)
                # Balance: clients already at the average size take no more of this category.
                is_open = sizes < cap
                proportions = proportions * is_open
                total = proportions.sum()
                if total == 0:  # tiny alpha can underflow every open share: spread evenly
                    proportions, total = is_open.astype(float), is_open.sum()
                proportions = proportions / total
                cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
                # Client i takes members[bounds[i]:bounds[i+1]], exactly as np.split would.
                bounds = np.minimum(np.concatenate(([0], cuts, [len(members)])), len(members))
                counts = np.diff(bounds)
                owner[members] = np.repeat(np.arange(num_clients), counts)
                sizes += counts
            short = int(np.count_nonzero(sizes < self.min_size))
            if short == 0:
                order = np.argsort(owner, kind="stable")  # stable: positions stay ascending
                return _finish(self.kind, np.split(order, np.cumsum(sizes)[:-1]))
            fewest_short = min(fewest_short, short)
        raise FedsimInputError(
            f"data.partition: kind=dirichlet could not reach min_size={self.min_size} for "
            f"{num_clients} clients after {self.max_attempts} attempts (at best {fewest_short} "
            f"clients fell short); lower data.partition.min_size, raise data.partition.alpha "
            "or use more records per client"
        )


class Shards(Partitioner):
    """Pathological non-IID split (McMahan et al.): sort by category, cut into equal contiguous
    shards, and give each client `shards_per_client` random shards, so most clients see only
    that many categories."""

    kind = "shards"

    def __init__(self, shards_per_client: int = 2) -> None:
        if shards_per_client < 1:
            raise FedsimInputError(
                f"data.partition.shards_per_client: must be >= 1, got {shards_per_client}"
            )
        self.shards_per_client = shards_per_client

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        n = len(categories)
        _check_counts(self.kind, n, num_clients)
        num_shards = num_clients * self.shards_per_client
        if num_shards > n:
            raise FedsimInputError(
                f"data.partition: kind=shards needs {num_shards} shards "
                f"({num_clients} clients x shards_per_client={self.shards_per_client}) but there "
                f"are only {n} records; lower data.partition.shards_per_client"
            )
        by_category = np.argsort(categories, kind="stable")  # stable: ties keep position order
        shards = np.array_split(by_category, num_shards)
        owners = rng.permutation(num_shards).reshape(num_clients, self.shards_per_client)
        return _finish(self.kind, [np.concatenate([shards[s] for s in row]) for row in owners])


class ByCategory(Partitioner):
    """Category-per-client split over the sorted list of categories.

    With at least as many clients as categories, client i serves category i % num_categories and
    each category's records are shuffled and split evenly among its clients. With fewer clients,
    client i gets the whole categories j with j % num_clients == i.
    """

    kind = "by_category"

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        _check_counts(self.kind, len(categories), num_clients)
        groups = list(_category_groups(categories).values())
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        if num_clients >= len(groups):
            for j, members in enumerate(groups):
                clients = range(j, num_clients, len(groups))
                for client, piece in zip(
                    clients, np.array_split(rng.permutation(members), len(clients)), strict=True
                ):
                    parts[client].append(piece)
        else:
            for j, members in enumerate(groups):
                parts[j % num_clients].append(members)
        return _finish(self.kind, [np.concatenate(p) for p in parts])


class SplitFile:
    """A fixed split read from JSON: `{"clients": [[line, ...], ...], "test": [line, ...]}`.

    The numbers are source indices (0-based line numbers of the source file), not table
    positions; map them with `positions_for`. `data.num_clients` must equal the number of lists
    in "clients" (the caller checks). "test" is optional.
    """

    kind = "split_file"

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Client source-index arrays (sorted) and the test source-index array (sorted)."""
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FedsimInputError(f"data.partition.path: split file not found: {self.path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FedsimInputError(f"{self.path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FedsimInputError(f"data.partition.path: cannot read {self.path} ({e})") from None
        except RecursionError:  # [[[[...: the decoder recurses once per level
            raise FedsimInputError(f"{self.path}: not valid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer of over 4300 digits, which int() refuses to build
            raise FedsimInputError(f"{self.path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
            raise FedsimInputError(f'{self.path}: expected an object with a "clients" list')
        if not data["clients"]:
            raise FedsimInputError(f'{self.path}: "clients" is empty')
        clients = [self._indices(c, f"clients[{i}]") for i, c in enumerate(data["clients"])]
        test = self._indices(data.get("test", []), "test")
        for i, c in enumerate(clients):
            if len(c) == 0:
                raise FedsimInputError(f"{self.path}: clients[{i}] is empty")
        owner = _first_overlap(clients)
        if owner is not None:
            value, a, b = owner
            raise FedsimInputError(
                f"{self.path}: line {value} is in both clients[{a}] and clients[{b}]"
            )
        shared = np.intersect1d(np.concatenate(clients), test)
        if len(shared):
            raise FedsimInputError(f'{self.path}: line {shared[0]} is in both a client and "test"')
        return clients, test

    def _indices(self, values: object, key: str) -> np.ndarray:
        if not isinstance(values, list) or not all(
            # below 2**63: the numbers go into an int64 array
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
            for v in values
        ):
            raise FedsimInputError(
                f"{self.path}: {key} must be a list of non-negative integer line numbers"
            )
        array = np.sort(np.asarray(values, dtype=np.int64))
        if len(array) > 1 and (dup := array[1:][array[1:] == array[:-1]]).size:
            raise FedsimInputError(f"{self.path}: {key} lists line {dup[0]} twice")
        return array


def positions_for(
    source_index_column: np.ndarray, wanted: np.ndarray, path: str, key: str = "clients"
) -> np.ndarray:
    """Table row positions of the records whose `source_index` is in `wanted` (same order).

    `key` names the list in errors, e.g. "PATH: clients[3] names line 20000 but the source has
    15011 records".
    """
    source_index_column = np.asarray(source_index_column, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    if len(wanted) == 0:
        return np.empty(0, dtype=np.int64)
    top = int(source_index_column.max()) if len(source_index_column) else -1
    too_big = wanted[wanted > top]
    if too_big.size:
        raise FedsimInputError(
            f"{path}: {key} names line {too_big[0]} but the source has "
            f"{len(source_index_column)} records"
        )
    lookup = np.full(top + 1, -1, dtype=np.int64)
    lookup[source_index_column] = np.arange(len(source_index_column))
    positions = lookup[wanted]
    missing = wanted[positions < 0]
    if missing.size:
        raise FedsimInputError(
            f"{path}: {key} names line {missing[0]}, which is not a record of the source "
            "(blank line?)"
        )
    return positions


def make_partitioner(
    kind: str,
    *,
    alpha: float = 0.5,
    min_size: int = 1,
    shards_per_client: int = 2,
    path: str | None = None,
) -> Partitioner | SplitFile:
    """The partitioner for `data.partition.kind`, built from its parameters."""
    if kind == "iid":
        return IID()
    if kind == "dirichlet":
        return Dirichlet(alpha, min_size=min_size)
    if kind == "shards":
        return Shards(shards_per_client)
    if kind == "by_category":
        return ByCategory()
    if kind == "split_file":
        if not path:
            raise FedsimInputError("data.partition.path: required with kind=split_file")
        return SplitFile(path)
    kinds = typing.get_args(PartitionKind)  # the names live in the config's schema
    raise FedsimInputError(
        f"data.partition.kind: unknown kind '{kind}'; expected one of {', '.join(kinds)}"
    )


def hold_out_test(
    categories: np.ndarray, per_category: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, test positions), both sorted: `per_category` random records of every
    category are held out for testing, as the reference code does (10 per Dolly category)."""
    if per_category < 0:
        raise FedsimInputError(f"data.test_per_category: must be >= 0, got {per_category}")
    test: list[np.ndarray] = []
    for category, members in _category_groups(categories).items():
        if len(members) < per_category + 1:
            raise FedsimInputError(
                f"data.test_per_category: category '{category}' has {len(members)} records; "
                f"holding out {per_category} needs at least {per_category + 1}"
            )
        test.append(rng.permutation(members)[:per_category])
    test_positions = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_positions = np.setdiff1d(np.arange(len(categories)), test_positions)
    return train_positions.astype(np.int64), test_positions.astype(np.int64)


def hold_out_per_client(
    parts: list[np.ndarray], fraction: float, rngs: Sequence[np.random.Generator]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training positions, held-out positions) of each client, both sorted: a random
    `fraction` of each client's records (rounded, at least one) is its own test slice, drawn with
    that client's generator `rngs[c]`, so one client's slice never depends on another's records.
    Every client keeps at least one record to train on."""
    if not 0 < fraction < 1:
        raise FedsimInputError(
            f"data.test_per_client: expected a fraction in (0, 1), got {fraction}"
        )
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for client, (part, rng) in enumerate(zip(parts, rngs, strict=True)):
        held = max(1, math.floor(fraction * len(part) + 0.5))  # half up: no banker's rounding
        if held >= len(part):
            raise FedsimInputError(
                f"data.test_per_client: client {client} has {len(part)} record(s); holding out "
                f"{held} leaves none to train on (raise data.partition.min_size or lower "
                "data.num_clients)"
            )
        picked = np.zeros(len(part), dtype=bool)
        picked[rng.permutation(len(part))[:held]] = True
        train.append(np.sort(part[~picked]).astype(np.int64))
        test.append(np.sort(part[picked]).astype(np.int64))
    return train, test


def category_histogram(categories: np.ndarray, indices: np.ndarray) -> dict[str, int]:
    """Records per category among `indices`, keyed by category in sorted order."""
    names, counts = np.unique(np.asarray(categories)[indices], return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


# --- helpers ------------------------------------------------------------------------------------


def _category_groups(categories: np.ndarray) -> dict[str, np.ndarray]:
    """Positions of each category, categories in sorted order (for determinism)."""
    names, inverse = np.unique(np.asarray(categories), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
    return {
        str(name): group.astype(np.int64)
        for name, group in zip(names, np.split(order, bounds), strict=True)
    }


def _check_counts(kind: str, num_records: int, num_clients: int) -> None:
    if num_clients < 1:
        raise FedsimInputError(f"data.num_clients: must be >= 1, got {num_clients}")
    if num_clients > num_records:
        raise FedsimInputError(
            f"data.num_clients: {num_clients} clients but only {num_records} training records "
            f"(kind={kind})"
        )


def _finish(kind: str, parts: list[np.ndarray]) -> list[np.ndarray]:
    """Sort each client's positions and reject a split that leaves a client empty."""
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise FedsimInputError(
                f"data.partition: client {client} would get no records with kind={kind}; "
                "use fewer clients or another partition"
            )
    return [np.sort(part).astype(np.int64) for part in parts]


def _first_overlap(clients: list[np.ndarray]) -> tuple[int, int, int] | None:
    """(line, client a, client b) for the first line listed by two clients, else None."""
    lines = np.concatenate(clients)
    owners = np.repeat(np.arange(len(clients)), [len(c) for c in clients])
    order = np.argsort(lines, kind="stable")
    lines, owners = lines[order], owners[order]
    same = np.flatnonzero(lines[1:] == lines[:-1])
    if not same.size:
        return None
    i = same[0]
    return int(lines[i]), int(owners[i]), int(owners[i + 1])
