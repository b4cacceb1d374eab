"""Resource figures each round records: peak memory of fedsim's processes, object-store bytes.

Peak memory is the process's `ru_maxrss` (the kernel's high-water mark of its resident set, over
its whole life so far), read with one `getrusage` call: cheap enough for every client turn.

`object_store_bytes` is fedsim's own accounting of the bytes it moves through Ray's object store
in one round, not Ray's internal counters: Ray keeps objects under 100 KiB inline in the owner's
in-process store rather than in plasma (a tiny model's adapter is a few KiB), so plasma usage
would read zero for exactly the runs one sweeps, and the per-process figures it has come from
`memory_summary`, a cluster-wide RPC too heavy for every round. See `round_object_store_bytes`.
"""

from __future__ import annotations

import resource
import sys

MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak if sys.platform == "darwin" else peak * 1024) / MB, 1)


def round_object_store_bytes(downlink_bytes: int, uplink_bytes: int, context_bytes: int = 0) -> int:
    """Bytes a round moves through the object store, each transfer counted once at its reader:

    - downlink: the global adapter, read by every dispatched task (adapter bytes x tasks; it is
      put once, by the aggregator's `finish_round` of the round before);
    - uplink: each client's upload (its update's tensors plus any client state, e.g. SCAFFOLD's
      control variate), put by its worker and read by the aggregator;
    - context: each client's `ClientContext` tensors (SCAFFOLD's correction), put by the
      aggregator and read by the client's worker; zero for the other strategies.

    Not counted: the once-per-run puts (the shards and the tiny model with
    `cluster.data_transport: object_store`), and the small control messages (tasks, outcomes,
    round summaries).
    """
    return int(downlink_bytes) + int(uplink_bytes) + int(context_bytes)
