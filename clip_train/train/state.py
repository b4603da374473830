"""What a run must carry across a restart besides what Accelerate saves (model, optimizer,
scheduler, RNG): the step counters, and where each rank's data stream stands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StreamState:
    """Where this process's data stream of the current checkpoint segment stands.

    data_pass: the pass over non-resampled shards; positions: per loader worker, the last raw sample
    position used (see build_train_loader's skip_through); next_worker: the loader worker whose
    batch comes next (they take turns). Each rank's stream is its own: it skips its own bad samples.
    """

    data_pass: int = 0
    positions: dict[int, int] = dataclasses.field(default_factory=dict)
    next_worker: int = 0

    def reset(self) -> None:
        """A new checkpoint segment: its stream from the beginning."""
        self.data_pass, self.positions, self.next_worker = 0, {}, 0

    def next_pass(self) -> None:
        """One pass over non-resampled shards ended: the next pass starts from its beginning."""
        self.data_pass += 1
        self.positions, self.next_worker = {}, 0

    def advance(self, positions: list[tuple[int, int]], num_workers: int) -> None:
        """After a batch whose samples came from these (worker, raw position) pairs."""
        for worker, position in positions:  # positions only grow within a worker's stream
            self.positions[worker] = max(position, self.positions.get(worker, 0))
        self.next_worker = (positions[0][0] + 1) % max(num_workers, 1)

    def state_dict(self) -> dict:
        return {"pass": self.data_pass, "positions": dict(self.positions), "next_worker": self.next_worker}

    def load_state_dict(self, saved: dict) -> None:
        self.data_pass = int(saved.get("pass", 0))
        self.positions = {int(w): int(n) for w, n in saved.get("positions", {}).items()}
        self.next_worker = int(saved.get("next_worker", 0))


@dataclass
class TrainState:
    """Registered with Accelerate for checkpointing: saved and restored with the model's state."""

    step: int = 0
    samples_seen: int = 0
    stream: StreamState = dataclasses.field(default_factory=StreamState)
    # the skip-rate guard's window: [read, skipped] totals of the run (see SkipRateGuard)
    skip_history: list = dataclasses.field(default_factory=list)
    rank: int = 0  # not saved: which entry of the saved per-rank data state is this process's
    # every rank's stream state, filled by gather_data_state() before a save; accelerate writes the
    # main process's state_dict only, so the other ranks' streams must travel in it
    data_by_rank: dict[int, dict] = dataclasses.field(default_factory=dict)

    def advance(self, samples: int) -> None:
        """One optimizer step (taken or skipped) of `samples` pairs over all processes."""
        self.step += 1
        self.samples_seen += samples

    def gather_data_state(self) -> None:
        """Collect every rank's stream state (all processes must call it)."""
        from accelerate.utils import gather_object

        self.data_by_rank = dict(enumerate(gather_object([self.stream.state_dict()])))

    def state_dict(self) -> dict:
        data = self.data_by_rank or {self.rank: self.stream.state_dict()}
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "data_by_rank": data,
            "skip_history": self.skip_history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.skip_history = state.get("skip_history", [])  # absent in checkpoints before the guard
        if "data_by_rank" in state:
            by_rank = {int(r): d for r, d in state["data_by_rank"].items()}
            # A rank the checkpoint has no entry for (more processes than it was saved with, accepted
            # by train.allow_resume_change) starts its segment's stream from the beginning.
            mine = by_rank.get(self.rank, {})
        else:  # a checkpoint from before per-rank data state: its one (main process's) state for all
            mine = {
                "pass": state.get("data_pass", 0),
                "positions": state.get("data_positions", {}),
                "next_worker": state.get("data_next_worker", 0),
            }
        self.stream.load_state_dict(mine)
        self.data_by_rank = {}
