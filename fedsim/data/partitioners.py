"""Partitioners: split the training records among virtual clients, one small class per scheme.

A partitioner sees only the records' categories (the label that makes data heterogeneous) and
returns, per client, the sorted positions of its records. Every record lands in exactly one client
and no client is left empty; a split that cannot satisfy that raises `FedsimInputError`.
`SplitFile` is the exception: it reads a fixed split (source line numbers) from a JSON file.

A split is a `ClientPositions`: every client's positions in one flat array plus offsets, so that
100,000 or 1,000,000 clients cost two arrays, not one numpy object per client. Categories may be
strings or integer codes ranked in the names' sorted order (`category_codes`): the splits are
the same.
"""

from __future__ import annotations

import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fedsim.config import PartitionKind
from fedsim.errors import FedsimInputError


class ClientPositions(Sequence[np.ndarray]):
    """Each client's record positions: client c holds `flat[offsets[c]:offsets[c + 1]]`.

    Indexing gives a read-only int64 view, so code written for a list of per-client arrays
    (`len(parts)`, `parts[c]`, iteration) keeps working without one object per client.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        # Read-only views (the caller's arrays stay writable): parts are handed out as views,
        # and nobody may edit the split through one.
        self.flat = np.asarray(flat, dtype=np.int64).view()
        self.offsets = np.asarray(offsets, dtype=np.int64).view()
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.flat):
            raise ValueError("offsets must run from 0 to len(flat)")
        self.flat.flags.writeable = False
        self.offsets.flags.writeable = False

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray]) -> ClientPositions:
        """The positions of a list of per-client arrays (copied)."""
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        flat = np.concatenate(parts).astype(np.int64) if len(parts) else np.empty(0, np.int64)
        return cls(flat, np.concatenate(([0], np.cumsum(sizes))))

    @classmethod
    def from_owner(cls, owner: np.ndarray, num_clients: int) -> ClientPositions:
        """Client c holds the positions i with owner[i] == c, ascending."""
        sizes = np.bincount(owner, minlength=num_clients)
        order = np.argsort(owner, kind="stable")  # stable: each client's positions ascending
        return cls(order, np.concatenate(([0], np.cumsum(sizes))))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @typing.overload
    def __getitem__(self, client: int) -> np.ndarray: ...

    @typing.overload
    def __getitem__(self, client: slice) -> list[np.ndarray]: ...

    def __getitem__(self, client: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(client, slice):  # as a list would: the parts, one view each
            return [self[c] for c in range(*client.indices(len(self)))]
        n = len(self)
        if not -n <= client < n:
            raise IndexError(f"client {client} out of range for {n} clients")
        client %= n
        return self.flat[self.offsets[client] : self.offsets[client + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for start, stop in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True):
            yield self.flat[start:stop]

    def sizes(self) -> np.ndarray:
        """Records per client."""
        return np.diff(self.offsets)

    def owners(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The client of each position in `flat[offsets[start]:offsets[stop]]`."""
        stop = len(self) if stop is None else stop
        return np.repeat(np.arange(start, stop), np.diff(self.offsets[start : stop + 1]))

    def map(self, values: np.ndarray) -> ClientPositions:
        """The same clients holding `values[p]` for each of their positions p."""
        return ClientPositions(np.asarray(values)[self.flat], self.offsets)

    @classmethod
    def empty(cls) -> ClientPositions:
        """No clients."""
        return cls(np.empty(0, dtype=np.int64), np.zeros(1, dtype=np.int64))

    @classmethod
    def single(cls, positions: np.ndarray) -> ClientPositions:
        """One part holding `positions` (the test split, say)."""
        return cls(positions, np.array([0, len(positions)]))


class Partitioner(ABC):
    """Splits record positions 0..len(categories)-1 among `num_clients` clients."""

    kind: str = ""

    @abstractmethod
    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> ClientPositions:
        """Per client, a sorted int64 array of record positions; together a partition of all."""


class IID(Partitioner):
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""

    kind = "iid"

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> ClientPositions:
        n = len(categories)
        _check_counts(self.kind, n, num_clients)
        order = rng.permutation(n)
        # Client c takes the c-th of np.array_split(order, num_clients): the first n % k parts
        # hold one record more.
        sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
        sizes[: n % num_clients] += 1
        owner = np.empty(n, dtype=_owner_dtype(num_clients))
        owner[order] = np.repeat(np.arange(num_clients, dtype=owner.dtype), sizes)
        return _finish(self.kind, ClientPositions.from_owner(owner, num_clients))


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
    ) -> ClientPositions:
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
                return _finish(self.kind, ClientPositions.from_owner(owner, num_clients))
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
    ) -> ClientPositions:
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
        # Shard s is the s-th of np.array_split(by_category, num_shards); client c takes the
        # shards in row c of the drawn permutation.
        shard_sizes = np.full(num_shards, n // num_shards, dtype=np.int64)
        shard_sizes[: n % num_shards] += 1
        drawn = rng.permutation(num_shards)
        shard_owner = np.empty(num_shards, dtype=np.int64)
        shard_owner[drawn] = np.repeat(np.arange(num_clients), self.shards_per_client)
        owner = np.empty(n, dtype=np.int64)
        owner[by_category] = np.repeat(shard_owner, shard_sizes)
        return _finish(self.kind, ClientPositions.from_owner(owner, num_clients))


class ByCategory(Partitioner):
    """Category-per-client split over the sorted list of categories.

    With at least as many clients as categories, client i serves category i % num_categories and
    each category's records are shuffled and split evenly among its clients. With fewer clients,
    client i gets the whole categories j with j % num_clients == i.
    """

    kind = "by_category"

    def split(
        self, categories: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> ClientPositions:
        _check_counts(self.kind, len(categories), num_clients)
        groups = list(_category_groups(categories).values())
        owner = np.empty(len(categories), dtype=np.int64)
        if num_clients >= len(groups):
            for j, members in enumerate(groups):
                clients = np.arange(j, num_clients, len(groups))
                # As np.array_split(shuffled, len(clients)): the first pieces one record larger.
                sizes = np.full(len(clients), len(members) // len(clients), dtype=np.int64)
                sizes[: len(members) % len(clients)] += 1
                owner[rng.permutation(members)] = np.repeat(clients, sizes)
        else:
            for j, members in enumerate(groups):
                owner[members] = j % num_clients
        return _finish(self.kind, ClientPositions.from_owner(owner, num_clients))


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
    categories: np.ndarray,
    per_category: int,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, test positions), both sorted: `per_category` random records of every
    category are held out for testing, as the reference code does (10 per Dolly category).
    With integer codes for `categories`, `names[code]` names a category in errors."""
    if per_category < 0:
        raise FedsimInputError(f"data.test_per_category: must be >= 0, got {per_category}")
    test: list[np.ndarray] = []
    for category, members in _category_groups(categories).items():
        if len(members) < per_category + 1:
            name = category if names is None else names[int(category)]
            raise FedsimInputError(
                f"data.test_per_category: category '{name}' has {len(members)} records; "
                f"holding out {per_category} needs at least {per_category + 1}"
            )
        test.append(rng.permutation(members)[:per_category])
    test_positions = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_positions = np.setdiff1d(np.arange(len(categories)), test_positions)
    return train_positions.astype(np.int64), test_positions.astype(np.int64)


def hold_out_per_client(
    parts: Sequence[np.ndarray], fraction: float, rngs: Sequence[np.random.Generator]
) -> tuple[ClientPositions, ClientPositions]:
    """(training positions, held-out positions) of each client, both sorted: a random
    `fraction` of each client's records (rounded, at least one) is its own test slice, drawn with
    that client's generator `rngs[c]`, so one client's slice never depends on another's records.
    Every client keeps at least one record to train on. `rngs` is indexed once per client, so it
    may build each generator on demand."""
    if not 0 < fraction < 1:
        raise FedsimInputError(
            f"data.test_per_client: expected a fraction in (0, 1), got {fraction}"
        )
    if len(parts) != len(rngs):
        raise ValueError(f"{len(parts)} clients but {len(rngs)} generators")
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    # Half up, as math.floor(fraction * n + 0.5) on each client (same float64 arithmetic).
    held = np.maximum(1, np.floor(fraction * sizes + 0.5).astype(np.int64))
    short = np.flatnonzero(held >= sizes)
    if short.size:
        client = int(short[0])
        raise FedsimInputError(
            f"data.test_per_client: client {client} has {sizes[client]} record(s); holding out "
            f"{held[client]} leaves none to train on (raise data.partition.min_size or lower "
            "data.num_clients)"
        )
    train_offsets = np.concatenate(([0], np.cumsum(sizes - held)))
    test_offsets = np.concatenate(([0], np.cumsum(held)))
    train = np.empty(train_offsets[-1], dtype=np.int64)
    test = np.empty(test_offsets[-1], dtype=np.int64)
    # One generator per client is inherent (each slice has its own stream); the results go
    # straight into the two flat arrays.
    for client, part in enumerate(parts):
        picked = np.zeros(len(part), dtype=bool)
        picked[rngs[client].permutation(len(part))[: held[client]]] = True
        train[train_offsets[client] : train_offsets[client + 1]] = np.sort(part[~picked])
        test[test_offsets[client] : test_offsets[client + 1]] = np.sort(part[picked])
    return ClientPositions(train, train_offsets), ClientPositions(test, test_offsets)


def category_histogram(categories: np.ndarray, indices: np.ndarray) -> dict[str, int]:
    """Records per category among `indices`, keyed by category in sorted order."""
    names, counts = np.unique(np.asarray(categories)[indices], return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


def category_counts(
    codes: np.ndarray, parts: ClientPositions, num_categories: int, start: int = 0, stop: int = -1
) -> np.ndarray:
    """Records per category code of clients `start`..`stop - 1` (all by default): one row per
    client, one column per code (one bincount, no per-client work)."""
    stop = len(parts) if stop < 0 else stop
    lo, hi = parts.offsets[start], parts.offsets[stop]
    cells = (parts.owners(start, stop) - start) * num_categories + codes[parts.flat[lo:hi]]
    counts = np.bincount(cells, minlength=(stop - start) * num_categories)
    return counts.reshape(stop - start, num_categories)


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


def _owner_dtype(num_clients: int) -> type[np.integer]:
    """int32 client ids where they fit: half the memory of int64 for an owner per record."""
    return np.int32 if num_clients < 2**31 else np.int64


def _check_counts(kind: str, num_records: int, num_clients: int) -> None:
    if num_clients < 1:
        raise FedsimInputError(f"data.num_clients: must be >= 1, got {num_clients}")
    if num_clients > num_records:
        raise FedsimInputError(
            f"data.num_clients: {num_clients} clients but only {num_records} training records "
            f"(kind={kind})"
        )


def _finish(kind: str, parts: ClientPositions) -> ClientPositions:
    """Reject a split that leaves a client empty."""
    empty = np.flatnonzero(parts.sizes() == 0)
    if empty.size:
        raise FedsimInputError(
            f"data.partition: client {empty[0]} would get no records with kind={kind}; "
            "use fewer clients or another partition"
        )
    return parts


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
