"""`compare(config)`: harvest -> train (one sweep per seed) -> evaluate -> results -> report.

Every stage leaves whole files or nothing (dictlearn.io), so a run stopped anywhere resumes from
what is there:

    DIR/activations.h5            harvested once; present means complete (written atomically)
    DIR/train/seed<S>/            the sweep of seed S: Lightning logs, checkpoints, final.ckpt
    DIR/exports/<name>/           written atomically after the sweep; never retrained
    DIR/evaluations/<name>.json   one evaluate record each; never re-evaluated
    DIR/results.jsonl, .csv, timings.json, figures/, report.md, report.html

Why one sweep per seed rather than one for everything: a sweep's exports only exist once all its
members finish, so splitting by seed gives a complete first frontier (every architecture and L0
target at one seed) halfway through, and a stopped run never has more than one sweep in flight.
Each sweep still reads every batch once for all its members.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch.distributed as dist

from dictlearn.compare import tune
from dictlearn.compare import workers as workers_module
from dictlearn.compare.include import check_included, evaluate_included
from dictlearn.compare.plan import CompareConfig, Planned, plan
from dictlearn.compare.progress import Progress
from dictlearn.compare.results import machine, results_line, write_results, write_timings
from dictlearn.compare.scan import write_l0_scan
from dictlearn.compare.sweeps import (  # noqa: F401 - also this module's names (replace_run.py, the CLI, tests)
    VALIDATION_ROWS, Evaluation, Source, _check_stop, _fit, _rank, _train_group, evaluate_options, not_evaluated,
    pending_sweeps, sweep_data)
from dictlearn.data.h5 import H5Array, check_activation_file
from dictlearn.errors import ConfigError, DataError
from dictlearn.io import atomic_write_text, check_writable_folder
from dictlearn.runtime import check_device
from dictlearn.training.fit import Stopped  # noqa: F401 - `dictlearn.compare.run.Stopped`, as before

OWN_ENTRIES = {"compare.yaml", "activations.h5", "train", "exports", "evaluations", "results.jsonl", "results.csv",
               "timings.json", "figures", "report.md", "report.html", "dashboards", "lr_search.json"}


# ----------------------------------------------------------------------------- checks, before any write
def check_source(config: CompareConfig, out: Path):
    """-> (Source, the loaded language model or None); every bad input a one-line error, nothing written."""
    if config.data is not None:
        path = Path(check_activation_file(config.data))

        for flag, key in (("--input-key", config.input_key), ("--target-key", config.target_key)):
            if key is not None:
                try:
                    H5Array(path, key)
                except DataError as error:
                    raise DataError(f"{flag} {key}: {error}") from None
        target = (config.input_key, config.target_key) if config.target_key else None
        return Source(path, (config.input_key, None), target), None
    check_hooks, default_hooks = _harvesting().check_hooks, _harvesting().default_hooks
    if config.corpus is not None and not Path(config.corpus).exists():
        raise ConfigError(f"--corpus {config.corpus}: no such file or folder; pass a text file or a folder of them")
    lm = _load_model(config.model)
    hooks = default_hooks(lm.model, config.layer)
    check_hooks(lm.model, hooks)
    return Source(out / "activations.h5", (hooks[0], None), (hooks[1], hooks[2]), hooks), lm


def _harvesting():
    """The harvest library, imported when a comparison harvests (it loads the language model stack)."""
    from dictlearn.harvest import activations

    return activations


def _load_model(name: str | None):
    from transformers.utils import logging as hf_logging

    from dictlearn.models.loading import load_model

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(name)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_out(config: CompareConfig) -> Path:
    """The run folder may hold this comparison (resume) or nothing; anything else is an error."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; pass a folder for the run")
    saved = out / "compare.yaml"
    if saved.is_file():
        previous = CompareConfig(**CompareConfig.from_yaml(saved)).identity()
        differing = [k for k, v in config.identity().items() if previous.get(k) != v]
        if differing:
            raise ConfigError(f"--out {out} holds a different comparison ({', '.join(differing)} differ from its "
                              f"compare.yaml); pass a new --out, or resume it with --config {saved}")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: folder is not empty and holds no compare.yaml; pass a new or empty folder")
    check_writable_folder(out, "--out")
    return out


# ----------------------------------------------------------------------------- the run
def compare(config: CompareConfig) -> Path:
    """Run (or resume) the comparison; -> the run folder. Raises `Stopped` on a signal."""
    check_device(config.device, allow_auto=True)  # before anything is written (compare.yaml included)
    config = config.resolved()
    if config.replace is not None:
        raise ConfigError("--replace: run it with dictlearn.compare.compare (dictlearn/compare/replace_run.py)")
    rank = _rank()
    out = check_out(config)
    source, lm = check_source(config, out)
    tune.check(config, source)
    planned = plan(config)
    included = check_included(config, source, lm, planned)  # outside dictionaries: refused here or never
    progress = Progress(len(planned), enabled=not config.quiet and rank == 0)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.yaml", config.to_yaml())
    started = time.perf_counter()
    with _signals_to_flag() as stop:
        if source.hooks is not None and not source.path.is_file():
            _harvest(config, lm, source, progress, stop)
        lm = None
        if config.tune_lr:  # each architecture's LR, chosen on validation documents first
            planned = plan(config, _search_lr(config, source, progress, stop))
        workers, threads = workers_module.plan_workers(config, planned) if config.workers > 1 else (1, None)
        if workers > 1:  # the sweeps, then the evaluations, side by side in worker processes
            _train_and_evaluate_in_workers(config, source, planned, progress, stop, workers, threads)
        else:
            _train_all(config, source, planned, progress, stop)
        _leave_process_group()  # evaluation runs on rank 0 alone; its metrics must not try to sync
        if rank != 0:
            return out
        from dictlearn.downstream import DownstreamCache

        cache = DownstreamCache(config.device)  # the language model, loaded once for evaluation and dashboards
        if workers == 1:
            _evaluate_all(config, source, planned, cache, progress, stop)
        records = [results_line(config, p, out) for p in planned]
        records += evaluate_included(config, source.path, included, evaluate_options(config), cache, probes=None,
                                     progress=progress, check_stop=lambda: _check_stop(stop))
        if config.interpret:
            _dashboards(config, planned, source, cache, progress, stop)
    write_results(out, records)
    if config.l0_scan:
        write_l0_scan(out, records)
    progress.stage("report", 1, unit="file")
    host = machine(config.device)  # ~0.1 s of matmuls: once, not once per timings write
    host |= {"workers": workers, "threads_per_worker": threads or host["torch_threads"]}
    write_timings(out, progress, time.perf_counter() - started, host, complete=False)
    _import_analysis().write_report(out, records, echo=not config.quiet)
    progress.finish()
    write_timings(out, progress, time.perf_counter() - started, host)
    return out


def _train_all(config: CompareConfig, source: Source, planned: list[Planned], progress: Progress,
               stop: threading.Event) -> None:
    """The seeds' sweeps one after another in this process (and its DDP ranks)."""
    sweep_seconds: list[float] = []  # of the sweeps trained so far, for the time left
    for i, seed in enumerate(config.seeds):
        mean = sum(sweep_seconds) / len(sweep_seconds) if sweep_seconds else 0.0
        progress.later = (len(config.seeds) - i - 1) * mean
        begun = time.perf_counter()
        if _train_group(config, source, [p for p in planned if p.seed == seed], f"seed{seed}", progress, stop):
            sweep_seconds.append(time.perf_counter() - begun)
    progress.later = 0.0


def _train_and_evaluate_in_workers(config: CompareConfig, source: Source, planned: list[Planned],
                                   progress: Progress, stop: threading.Event, workers: int, threads: int) -> None:
    """`--workers N`: the pending sweeps, then the pending evaluations, split between N processes
    (dictlearn/compare/workers.py); the same files as `_train_all` and `_evaluate_all` write."""
    out = Path(config.out)
    groups = pending_sweeps(out, {f"seed{seed}": [p for p in planned if p.seed == seed] for seed in config.seeds},
                            progress)
    todo = not_evaluated(out, planned)
    with workers_module.Pool(config, source, workers, threads) as pool:
        if groups:
            pool.train(groups, progress, stop)
        pool.evaluate(todo, progress, stop)


def _leave_process_group(barrier: bool = True) -> None:
    """End DDP's process group (all ranks, after the last sweep), if there is one."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _search_lr(config: CompareConfig, source: Source, progress: Progress, stop: threading.Event) -> dict[str, float]:
    """--tune-lr's search (compare/tune.py), its runs trained by `_fit` on the validation split."""

    def train(group: list[Planned], folder: Path, documents) -> None:
        _check_stop(stop)
        data = sweep_data(config, source, group[0].seed)
        data.use_split(documents.split(data.block_size, min(VALIDATION_ROWS, documents.stop - documents.start)))
        _fit(config, source, group, folder, progress, data=data)

    return tune.search(config, source, train)


def _import_analysis():
    """`dictlearn.analysis.report` (figures and the report), the last stage, imported when it is reached."""
    from dictlearn.analysis import report

    return report


class _signals_to_flag:
    """SIGTERM/SIGINT set a flag that the stages read between units of work (during training,
    Lightning and RunGuard handle them: stop after the step, save a checkpoint)."""

    def __enter__(self) -> threading.Event:
        self.event, self.previous = threading.Event(), {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self.event

    def _handler(self, signum, frame) -> None:
        self.event.signum = signum
        self.event.set()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _harvest(config: CompareConfig, lm, source: Source, progress: Progress, stop: threading.Event) -> None:
    from dictlearn.models.tiny import DEFAULT_CONTEXT

    harvesting = _harvesting()
    context = config.context or min(DEFAULT_CONTEXT, harvesting.max_positions(lm.model) or DEFAULT_CONTEXT)
    progress.stage("harvest", config.tokens)
    rows_per_batch = harvesting.DEFAULT_BATCH_SIZE * (context - 1)  # BOS positions are dropped
    batches = [0]

    def should_stop() -> bool:  # asked before each batch: the harvest's progress tick
        progress.update(min(config.tokens, batches[0] * rows_per_batch), tokens=batches[0] * rows_per_batch)
        batches[0] += 1
        return stop.is_set()

    try:
        harvesting.harvest(lm, source.hooks, source.path, config.tokens, context, corpus=config.corpus,
                           device=config.device, progress=False, should_stop=should_stop)
    except harvesting._Terminated:
        raise Stopped(128 + int(getattr(stop, "signum", signal.SIGTERM))) from None


def _evaluate_all(config: CompareConfig, source: Source, planned: list[Planned], cache, progress: Progress,
                  stop: threading.Event) -> None:
    out = Path(config.out)
    evaluation = Evaluation(config, source, cache)
    todo = not_evaluated(out, planned)
    progress.stage("evaluate", max(1, len(todo)), unit="dict")
    for i, p in enumerate(todo):
        _check_stop(stop)
        evaluation(p)
        progress.update(i + 1)


# A dashboard per architecture on the default path must cost seconds: the first rows of the file and
# a few cards (measured in docs/interpret.md); `dictlearn inspect` on an export draws the full page.
DASHBOARD_ROWS, DASHBOARD_CARDS = 20_000, 12


def dashboard_members(planned: list[Planned]) -> list[Planned]:
    """One dictionary per architecture: its middle L0 target (of the sorted targets), the first
    seed and the first width in the plan."""
    chosen = {}
    for architecture in dict.fromkeys(p.architecture for p in planned):
        members = [p for p in planned if p.architecture == architecture]
        targets = sorted({p.l0_target for p in members})
        middle = targets[(len(targets) - 1) // 2]
        chosen[architecture] = next(p for p in members if p.l0_target == middle)
    return list(chosen.values())


def dashboard_pages(planned: list[Planned], chosen: Planned) -> dict[int, Planned]:
    """{d_sae: member} of the chosen member's page(s): its architecture, L0 target and seed at every
    width of the plan (a size sweep: one page per width, each card with its family across sizes)."""
    same = {p.d_sae: p for p in planned
            if (p.architecture, p.l0_target, p.seed) == (chosen.architecture, chosen.l0_target, chosen.seed)}
    return {d: same[d] for d in sorted(same)}


def _page_names(architecture: str, members: dict[int, Planned]) -> dict[int, str]:
    if len(members) == 1:
        return {d: f"{architecture}.html" for d in members}
    return {d: f"{architecture}_d{d}.html" for d in members}


def _dashboards(config: CompareConfig, planned: list[Planned], source: Source, cache, progress: Progress,
                stop: threading.Event) -> None:
    """DIR/dashboards/<architecture>.html, or <architecture>_d<d_sae>.html per width of a size sweep
    (interpret/families.py), skipped where they exist (resume)."""
    from dictlearn.interpret.dashboard import InspectOptions, inspect
    from dictlearn.interpret.families import ladder_dashboards

    out = Path(config.out)
    boards = [(p, dashboard_pages(planned, p)) for p in dashboard_members(planned)]
    todo = [(p, members) for p, members in boards
            if not all((out / "dashboards" / name).is_file() for name in _page_names(p.architecture, members).values())]
    progress.stage("interpret", max(1, len(todo)), unit="dict")
    # record=False: a comparison never rewrites an export (steer measures the maximum from the file instead)
    options = InspectOptions(rows=DASHBOARD_ROWS, cards=DASHBOARD_CARDS, device=config.device, record=False)
    for i, (p, members) in enumerate(todo):
        _check_stop(stop)
        export = out / "exports" / p.name
        name = json.loads((export / "cfg.json").read_text()).get("metadata", {}).get("model_name")
        lm = cache.model(name) if name else None
        pages = {d: out / "dashboards" / page for d, page in _page_names(p.architecture, members).items()}
        if len(members) > 1:
            ladder_dashboards({d: out / "exports" / m.name for d, m in members.items()}, source.path, pages, options,
                              lm=lm)
        else:
            inspect(export, source.path, pages[p.d_sae], options, echo=False, lm=lm)
        progress.update(i + 1)
