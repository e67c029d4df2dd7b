"""One progress display for the whole `dictlearn compare` run: stage, dictionaries done, tokens/s,
time left. On a terminal it is one line redrawn in place; otherwise (a log file, CI) a line every
`LOG_EVERY_S` seconds. Stage times are kept for `timings.json`.
"""

from __future__ import annotations

import sys
import time

import lightning as L

LOG_EVERY_S, REDRAW_EVERY_S = 15.0, 0.5


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The run's display. `stage(name, total)` starts a stage of `total` units (tokens or
    dictionaries); `update(done, tokens=...)` reports within it; `later` holds the estimated
    seconds of the stages still to come, for the time left."""

    def __init__(self, n_dictionaries: int, enabled: bool = True, stream=None) -> None:
        self.n_dictionaries, self.enabled = n_dictionaries, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done_dictionaries = 0
        self.seconds: dict[str, float] = {}
        self.later = 0.0
        self._stage, self._start, self._total, self._done, self._tokens = None, 0.0, 0, 0, 0
        self._shown = 0.0

    def stage(self, name: str, total: int, unit: str = "tok") -> None:
        self._close_stage()
        self._stage, self._start, self._total, self._done, self._tokens, self._unit = (
            name, time.perf_counter(), max(1, total), 0, 0, unit)
        self._rate_start = self._start
        self._draw(force=True)

    def update(self, done: int, tokens: int | None = None) -> None:
        self._done = done
        if tokens is not None:
            self._tokens = tokens
        self._draw()

    def work_started(self) -> None:
        """The stage's work begins now: rates and time left leave out what came before (a
        sweep's data-dependent initialisation, which took the first minute of a stage)."""
        self._rate_start = time.perf_counter()

    def finish(self) -> None:
        self._close_stage()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (a stage skipped, a resume)."""
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + f"dictlearn compare: {text}\n")
            self.stream.flush()

    def left(self) -> float | None:
        elapsed = time.perf_counter() - self._rate_start
        if self._done <= 0:
            return None
        return elapsed * (self._total - self._done) / self._done + self.later

    def _close_stage(self) -> None:
        if self._stage is not None:
            key = self._stage.split()[0]
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - self._start
            self._draw(force=True)
            self._stage = None

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or self._stage is None:
            return
        now = time.perf_counter()
        if not force and now - self._shown < (REDRAW_EVERY_S if self.tty else LOG_EVERY_S):
            return
        self._shown = now
        elapsed = max(now - self._rate_start, 1e-9)
        rate = self._tokens / elapsed if self._tokens else None
        parts = [f"{self._stage} {100 * min(self._done, self._total) / self._total:3.0f}%",
                 f"dictionaries {self.done_dictionaries}/{self.n_dictionaries}"]
        if rate:
            parts.append(f"{rate:,.0f} tok/s")
        parts.append(f"~{_duration(self.left())} left")
        line = "dictlearn compare: " + " | ".join(parts)
        self.stream.write(f"\r\033[K{line}" if self.tty else line + "\n")
        self.stream.flush()


class TrainingProgress(L.Callback):
    """Feeds a sweep's steps to the run's `Progress` (tokens = steps x batch x members x ranks)."""

    def __init__(self, progress: Progress, tokens_per_step: int) -> None:
        self.progress, self.tokens_per_step = progress, tokens_per_step
        self._first_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_step = trainer.global_step
        self.progress.work_started()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.is_global_zero:
            done = trainer.global_step - self._first_step
            self.progress.update(done, tokens=done * self.tokens_per_step * trainer.world_size)
