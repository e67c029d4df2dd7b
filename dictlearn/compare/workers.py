"""`dictlearn compare --workers N`: the seeds' sweeps, then the evaluations, in N worker processes.

Why processes: most of a member-step at the CPU defaults (d_in 128, d_sae 512, batch 1024) is
per-operation overhead and memory-bound elementwise work on [batch, d_sae] tensors, which two
threads inside one process share badly and two processes do not (measured on a 2-core AMD EPYC:
docs/compare.md, "Worker processes").

The parent keeps what happens once per run (harvest, --tune-lr, included dictionaries, dashboards,
results, report). Each worker takes tasks from one queue, in plan order: a seed's sweep
(`sweeps._train_group`, into the same DIR/train/seed<S>/ as one process would, so a run folder
resumes whatever N was before), then one dictionary's evaluation each (the worker's own
DownstreamCache and ProbeCache, built at its first). Workers report steps and finished tasks
through a second queue; the parent draws the one progress line and writes results in plan order.

Stopping: workers start with SIGINT and SIGTERM ignored (blocked in the parent while it starts
them, so the parent loses none). The parent asks them to stop through an Event: during a fit a
callback turns it into RunGuard's stop at the end of the step (interrupted-step=N.ckpt), between
tasks `_check_stop` reads it. A signal sent to a worker during a fit (Ctrl-C reaches the whole
process group) stops it the same way. A worker whose parent died stops as for SIGTERM. Every exit
of the parent joins its workers, and kills those that have not ended after `STOP_GRACE_S`.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import queue as queues
import signal
import threading
import time
import traceback
from pathlib import Path

import lightning as L
import torch

from dictlearn.callbacks import RunGuard
from dictlearn.compare import sweeps
from dictlearn.compare.plan import CompareConfig, Planned
from dictlearn.compare.progress import Progress
from dictlearn.errors import DictLearnError
from dictlearn.training.fit import Stopped, checkpoint_step, latest_checkpoint

SIGNALS = {signal.SIGINT, signal.SIGTERM}
POLL_S = 0.1
STOP_GRACE_S = 120.0  # a worker asked to stop ends its step and saves a checkpoint (seconds at most)
RELAY_EVERY_S = 0.25  # step reports per worker at most this often


class WorkerFailed(RuntimeError):
    """A worker raised something other than a one-line error (a bug; its traceback is the message),
    or ended without saying why."""


def plan_workers(config: CompareConfig, planned: list[Planned]) -> tuple[int, int]:
    """-> (worker processes, torch threads each) for what is left of the run (1: the one-process
    path). As many workers as sweeps are left to train (all of `config.workers` when only
    evaluations are left); the parent's threads shared between them."""
    out = Path(config.out)
    seeds = {p.seed for p in planned if not sweeps.exported(out, p.name)}
    n = max(1, min(config.workers, len(seeds) if seeds else len(sweeps.not_evaluated(out, planned))))
    return n, threads_each(n)


def threads_each(n: int) -> int:
    """Torch threads for each of `n` workers: this process's shared out, at least one."""
    return max(1, torch.get_num_threads() // max(1, n))


# ----------------------------------------------------------------------------- the parent's side
class Pool:
    """N spawned workers (`with Pool(...) as pool:`); `train` and `evaluate` hand them tasks and
    wait, raising a worker's error (one-line errors as themselves) or `Stopped`."""

    def __init__(self, config: CompareConfig, source: sweeps.Source, n: int, threads: int) -> None:
        self.config, self.source, self.n, self.threads = config, source, n, threads
        self.processes: list[multiprocessing.Process] = []

    def __enter__(self) -> Pool:
        context = multiprocessing.get_context("spawn")  # not fork: the parent's torch threads run
        self.tasks, self.events = context.Queue(), context.Queue()
        self.asked, self.signum = context.Event(), context.Value("i", 0)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # pending here until restored below
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS} if _main_thread() else {}
        try:  # a child inherits ignored dispositions (and the mask) through exec
            for i in range(self.n):
                process = context.Process(target=_worker, name=f"dictlearn-compare-worker{i}", daemon=True, args=(
                    self.config, self.source, i, self.threads, self.tasks, self.events, self.asked, self.signum))
                self.processes.append(process)
                process.start()
        except BaseException:
            self.close()  # `with` calls no __exit__ when __enter__ raises
            raise
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ask every worker to end, wait for it (STOP_GRACE_S), kill what is left."""
        if not self.processes:
            return
        self._ask_stop(signal.SIGTERM)
        for _ in self.processes:
            self.tasks.put(None)
        deadline = time.monotonic() + STOP_GRACE_S
        while (alive := [p.sentinel for p in self.processes if _started(p) and p.is_alive()]) and \
                time.monotonic() < deadline:
            _drain(self.events)  # a worker ends only once its reports are read (its queue's feeder thread)
            multiprocessing.connection.wait(alive, timeout=POLL_S)
        for process in self.processes:
            if _started(process) and process.is_alive():
                process.kill()
                process.join()
        for q in (self.tasks, self.events):
            q.cancel_join_thread()
            q.close()
        self.processes = []

    def _ask_stop(self, signum: int) -> None:
        if not self.asked.is_set():
            self.signum.value = int(signum)
            self.asked.set()

    # ------------------------------------------------------------------ the two stages
    def train(self, groups: dict[str, list[Planned]], progress: Progress, stop: threading.Event) -> None:
        """Each sweep of `groups` ({label: members}) by a worker; one progress stage for all."""
        out = Path(self.config.out)
        left = {label: self._steps_left(out / "train" / label) for label in groups}
        progress.stage(f"train {','.join(groups)}", max(1, sum(left.values())))
        done, tokens, started = dict.fromkeys(groups, 0), dict.fromkeys(groups, 0), [False]

        def on_message(message: tuple) -> None:
            kind = message[0]
            if kind == "steps":
                _, label, steps, seen = message
                done[label], tokens[label] = steps, seen
                progress.update(sum(done.values()), tokens=sum(tokens.values()))
            elif kind == "started" and not started[0]:
                started[0] = True
                progress.work_started()
            elif kind == "note":
                progress.note(message[1])
            elif kind == "done":
                label = message[2]
                done[label] = left[label]
                progress.done_dictionaries += len(groups[label])
                progress.update(sum(done.values()))

        self._run([("train", (label, group)) for label, group in groups.items()], on_message, stop)

    def evaluate(self, todo: list[Planned], progress: Progress, stop: threading.Event) -> None:
        """Each dictionary of `todo` evaluated by a worker into DIR/evaluations/<name>.json."""
        progress.stage("evaluate", max(1, len(todo)), unit="dict")
        count = [0]

        def on_message(message: tuple) -> None:
            if message[0] == "done":
                count[0] += 1
                progress.update(count[0])

        self._run([("evaluate", p) for p in todo], on_message, stop)

    def _steps_left(self, folder: Path) -> int:
        if (folder / "final.ckpt").is_file():
            return 0
        resume = latest_checkpoint(folder / "checkpoints")
        return self.config.steps - (checkpoint_step(resume) if resume is not None else 0)

    def _run(self, tasks: list[tuple], on_message, stop: threading.Event) -> None:
        """Queue `tasks`, pass the workers' reports to `on_message` until every task is done; on a
        signal (`stop`) or a worker's error, stop every worker and raise."""
        pending = {_key(task) for task in tasks}
        for task in tasks:
            self.tasks.put(task)
        failure: BaseException | None = None
        ended: set[int] = set()
        while (pending if failure is None else len(ended) < len(self.processes)):
            if stop.is_set() and failure is None:
                failure = Stopped(128 + int(getattr(stop, "signum", signal.SIGTERM)))
                self._ask_stop(failure.code - 128)
            try:
                message = self.events.get(timeout=POLL_S)
            except queues.Empty:
                dead = [i for i, p in enumerate(self.processes) if i not in ended and p.exitcode is not None]
                for i in dead:
                    ended.add(i)
                    if failure is None:
                        failure = WorkerFailed(f"compare worker {i} ended (exit code {self.processes[i].exitcode}) "
                                               "without a report; rerun the same command to resume")
                if failure is not None and dead:
                    self._ask_stop(signal.SIGTERM)
                continue
            kind, worker = message[0], message[1]
            if kind == "done":
                pending.discard(message[2])
            if kind in ("stopped", "error", "failed"):
                ended.add(worker)
                if failure is None:
                    failure = _failure(message)
                    self._ask_stop(failure.code - 128 if isinstance(failure, Stopped) else signal.SIGTERM)
            elif failure is None:
                on_message((kind, *message[2:]) if kind != "done" else message)
        if failure is not None:
            raise failure


def _drain(q) -> None:
    try:
        while True:
            q.get_nowait()
    except queues.Empty:
        pass


def _key(task: tuple) -> str:
    kind, payload = task
    return payload[0] if kind == "train" else payload.name


def _failure(message: tuple) -> BaseException:
    """A worker's last report -> what the parent raises: Stopped, the same one-line error, or WorkerFailed."""
    kind, worker, detail = message
    if kind == "stopped":
        return Stopped(detail)
    if kind == "error":
        module, name, text = detail
        cls = getattr(importlib.import_module(module), name)
        error = cls.__new__(cls)  # the same class with the same line, whatever its constructor takes
        error.args = (text,)
        return error
    return WorkerFailed(f"compare worker {worker} failed:\n{detail}")


def _started(process: multiprocessing.Process) -> bool:
    return process.pid is not None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- the worker's side
class _Asked:
    """A worker's stop flag, as `sweeps._check_stop` reads it: the parent's Event, or the parent gone."""

    def __init__(self, event, signum) -> None:
        self.event, self._signum, self.orphaned = event, signum, False

    def is_set(self) -> bool:
        return self.orphaned or self.event.is_set()

    @property
    def signum(self) -> int:
        return signal.SIGTERM if self.orphaned else (self._signum.value or signal.SIGTERM)


class StopWhenAsked(L.Callback):
    """Stops a worker's fit at the end of the step once its parent asks (RunGuard saves the checkpoint)."""

    def __init__(self, asked: _Asked) -> None:
        self.asked = asked

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.asked.is_set():
            next(c for c in trainer.callbacks if isinstance(c, RunGuard)).request_stop(self.asked.signum)


class RelayProgress:
    """What `sweeps._train_group` and `TrainingProgress` report, sent to the parent's queue."""

    def __init__(self, events, worker: int) -> None:
        self.events, self.worker = events, worker
        self.done_dictionaries, self.later = 0, 0.0  # the parent counts them
        self.label, self._total, self._sent = "", 0, 0.0

    def stage(self, name: str, total: int, unit: str = "tok") -> None:
        self.label, self._total = name.split()[-1], total

    def work_started(self) -> None:
        self.events.put(("started", self.worker))

    def update(self, done: int, tokens: int | None = None) -> None:
        now = time.monotonic()
        if now - self._sent >= RELAY_EVERY_S or done >= self._total:
            self._sent = now
            self.events.put(("steps", self.worker, self.label, done, tokens or 0))

    def note(self, text: str) -> None:
        self.events.put(("note", self.worker, text))


def _worker(config: CompareConfig, source: sweeps.Source, index: int, threads: int, tasks, events, event,
            signum) -> None:
    """A worker's life: tasks from `tasks` until None; one report per task, and a last one on error."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # still ignored: a fit's handlers take them
    torch.set_num_threads(threads)
    asked = _Asked(event, signum)
    threading.Thread(target=_watch_parent, args=(asked,), daemon=True).start()
    progress, evaluation = RelayProgress(events, index), None
    try:
        while not asked.is_set():
            try:
                task = tasks.get(timeout=POLL_S)
            except queues.Empty:
                continue
            if task is None:
                return
            kind, payload = task
            if kind == "train":
                label, group = payload
                sweeps._train_group(config, source, group, label, progress, asked,
                                 extra_callbacks=[StopWhenAsked(asked)])
            else:
                sweeps._check_stop(asked)
                evaluation = evaluation or sweeps.Evaluation(config, source)
                evaluation(payload)
            events.put(("done", index, _key(task)))
    except Stopped as stopped:
        events.put(("stopped", index, stopped.code))
    except DictLearnError as error:
        events.put(("error", index, (type(error).__module__, type(error).__qualname__, str(error))))
    except BaseException:  # noqa: BLE001 - a bug: its traceback goes to the parent
        events.put(("failed", index, traceback.format_exc()))


def _watch_parent(asked: _Asked) -> None:
    """The parent gone (killed): stop as for SIGTERM, and leave after STOP_GRACE_S in any case."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    asked.orphaned = True
    time.sleep(STOP_GRACE_S)
    os._exit(1)
