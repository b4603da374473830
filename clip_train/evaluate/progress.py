"""Evaluation progress: a bar on a terminal, else one log line per task with images/s and an ETA.

    progress = EvalProgress(len(tasks), enabled=distributed.is_main())
    progress.task_done("fashion-mnist", images=1000)   # after each task
    progress.close()

On a terminal (stderr is a tty) a tqdm bar over the tasks, with the last task's images/s. Cluster
logs (not a terminal) get a plain line per task instead, as training prints its records
(tracking.MetricsLogger): a bar's carriage returns would garble them. Both go to stderr, so that
clip-eval's stdout stays its metrics. The ETA is the mean time per task so far times the tasks left;
tasks differ in size, so it is a guide, as a bar's is.
"""

from __future__ import annotations

import sys
import time


class EvalProgress:
    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0
        self.stream = sys.stderr  # looked up now: a test's capture (or a redirect) is seen
        self.started = self._last = time.perf_counter()
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="task", desc="eval", dynamic_ncols=True, leave=False, file=self.stream
            )

    def task_done(self, name: str, images: int) -> None:
        """One task finished: `images` is how many images it evaluated (its size, not its encodes)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.done += 1
        if not self.enabled:
            return
        rate = images / seconds if seconds > 0 else 0.0
        if self.bar is not None:
            self.bar.set_postfix(task=name, images_s=f"{rate:.1f}", refresh=False)
            self.bar.update(1)
            return
        eta = (now - self.started) / self.done * (self.total - self.done)
        line = (
            f"[eval {self.done}/{self.total}] {name}: {images} images in {seconds:.1f} s, "
            f"{rate:.1f} images/s, ETA {eta:.0f} s"
        )
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
