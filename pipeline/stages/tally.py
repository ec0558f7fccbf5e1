"""Run-wide counters that no row carries: inputs seen, inputs still to do, locations storage could not read.

O(1) state whatever the corpus size: counts, plus the first :data:`MAX_NOTED`
unreadable locations (with a count of the rest). ``pipeline.graph`` runs one as a
Ray actor per run; stages used alone take a plain :class:`RunTally`.
"""

from __future__ import annotations

from typing import Any

from pipeline.outputs import one_line

MAX_NOTED = 50


class RunTally:
    """Counters (``inputs``, ``pending``) and unreadable locations, added to from any task."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.unread: dict[str, str] = {}
        self.unread_count = 0

    def add(self, **counts: int) -> None:
        for name, value in counts.items():
            self.totals[name] = self.totals.get(name, 0) + int(value)

    def note_unread(self, uri: str, reason: str) -> None:
        """A shard / manifest part that storage could not deliver: no row, reported, retried next run."""
        if uri not in self.unread:
            self.unread_count += 1
            if len(self.unread) < MAX_NOTED:
                self.unread[uri] = one_line(reason)

    def counts(self) -> dict[str, Any]:
        return {**self.totals, "unread": dict(self.unread), "unread_count": self.unread_count}


class RemoteTally:
    """A :class:`RunTally` running as a Ray actor (one per run), callable from any task."""

    def __init__(self) -> None:
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a lost worker node must not take the run's counts with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.handle = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(RunTally).remote()

    def add(self, **counts: int) -> None:
        import ray

        ray.get(self.handle.add.remote(**counts))

    def note_unread(self, uri: str, reason: str) -> None:
        import ray

        ray.get(self.handle.note_unread.remote(uri, reason))

    def counts(self) -> dict[str, Any]:
        import ray

        return ray.get(self.handle.counts.remote())

    def close(self) -> None:
        """End the actor now (the stages and datasets that hold copies of the handle may outlive the run)."""
        import ray

        ray.kill(self.handle, no_restart=True)
