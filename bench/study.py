"""The study: tasks x methods x seeds for one backbone, each task's own run config, through the contract CLI; then
src.evaluate over every run, a per-run CSV and the tables (dev metric mean ± std, time, ranks, parameters, tests).

    uv sync --group demo && uv run python bench/study.py                       # offline demo: MiniLM, SST-2, 3 seeds
    uv run python bench/study.py --tasks SST-2 CoLA MRPC STS-B --methods comparative-2 comparative-1 proposed \\
        proposed-params --seeds 42 43 44 45 46 --results-dir results/study --plan      # what is left, and how long
    uv run python bench/study.py --tasks SST-2 CoLA MRPC STS-B ... --results-dir results/study   # train what is left
    uv run python bench/study.py --backbone DeBERTa-v3-base-86M --tasks RTE MRPC --data-dir /data/glue \\
        --set hardware.device=cuda                                  # one run per GPU when there are several
    uv run python bench/study.py ... --seeds 42 43 44 45 46 --until-decided --max-seeds 10   # a seed at a time

Run ids are `{method}-{backbone}--GLUE-{task}`: every run uses its own `config/run/{run id}.yaml`, so a variant such
as `proposed-params` needs a config per task (a delta on that task's GLoRA config); a missing one stops the study
before anything trains, naming it. Runs go seed-major (every task and method of the first seed, then the next), so a
study cut short still has whole seeds. Re-running the same command skips finished runs and resumes an interrupted run
from its checkpoint (the CLI does that); `--plan` lists the runs and forecasts the rest from one trial run per config
(`mode=trial` into `{results_dir}/.plan/`, kept for the next `--plan`); `--no-train` evaluates what has finished.
`--set adalora.*` reaches the AdaLoRA-type runs only, `--set glo_ra.*` the GLoRA-type runs only, `eva.*` EVA's, decided from
each run config (model.peft.type and its sections), not from the prefix. With several GPUs visible and runs not on
the CPU, one run goes to each GPU at a time (CUDA_VISIBLE_DEVICES per run, logs in `{results_dir}/.logs/`); on the
CPU, one run at a time. At the end: `src.evaluate`, the per-run CSV (`--csv`, default `{results_dir}/study-
{backbone}.csv`) and the tables. `--until-decided --max-seeds N`: after `--seeds`, the next seed for every task and
method, one look at a time, until every primary verdict is decided or N seeds are reached, each look's verdicts at
the level an alpha-spending function allots (src/evaluate.py SEQUENTIAL_RULE).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import io
import itertools
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src.evaluate import SPENDING_NAMES, TASKS, atomic_write, load_settings, look_alphas  # noqa: E402

METHODS = ["comparative-2", "comparative-1", "proposed"]  # LoRA, AdaLoRA, GLoRA
BACKBONES = ["MiniLM-L6-22M", "DeBERTa-v3-base-86M"]
TASK_NAMES = {folder: task for task, folder in TASKS.items()}
CONFIG = OmegaConf.load(REPO / "config" / "config.yaml")
DEFAULT_SEED = CONFIG.default_seed  # its runs have no -seed{N} suffix
RUN_DIR = REPO / "config" / "run"
DEMO = "MiniLM-L6-22M--GLUE-SST-2"
CSV_COLUMNS = ["task", "method", "method_name", "seed", "metric", "value", "train_time_s", "step_time_median_s",
               "trainable_params", "adapter_params", "rank_total", "adapter_params_effective", "eval_time_s",
               "resumes", "run", "steps"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results/study")
    p.add_argument("--backbone", default="MiniLM-L6-22M", choices=BACKBONES)
    p.add_argument("--methods", nargs="+", default=METHODS, metavar="PREFIX",
                   help=f"run-id prefixes of config/run/{{PREFIX}}-{{backbone}}--GLUE-{{task}}.yaml "
                        f"(default: {' '.join(METHODS)})")
    p.add_argument("--tasks", nargs="+", default=["SST-2"], choices=sorted(TASK_NAMES), metavar="TASK",
                   help=f"GLUE folder names: {' '.join(sorted(TASK_NAMES))} (default: SST-2)")
    p.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED, DEFAULT_SEED + 1, DEFAULT_SEED + 2])
    p.add_argument("--data-dir", default=None, help="GLUE folder in the official layout (default: each config's)")
    p.add_argument("--model", default=None, help="save_pretrained folder (default: each config's backbone)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--plan", action="store_true", help="list the runs, which are done, and forecast the rest; "
                                                       "train nothing")
    p.add_argument("--no-train", action="store_true", help="evaluate and tabulate the finished runs only")
    p.add_argument("--gpu-check", default=None, metavar="FILE",
                   help="with --plan: forecast in GPU-hours from bench/gpu_check.py's measured rates (its --out "
                        "JSON) instead of trial runs on this machine; --gpus N: the node's GPUs (auto: visible, "
                        "else 1)")
    p.add_argument("--gpus", default="auto", help="parallel runs, one per GPU: 'auto' (every visible GPU when the "
                                                  "runs are not on the CPU), a number, or 0 (one at a time)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="runs that share one GPU at a time (each its own process and log): a DeBERTa-base run with "
                        "LoRA leaves most of an 80-140 GiB GPU's memory and much of its compute idle (bench/"
                        "gpu_check.py gives a run's peak memory); seeds of one config that start together are "
                        "workers of its one Optuna study")
    p.add_argument("--csv", default=None, help="per-run table (default: {results_dir}/study-{backbone}.csv)")
    p.add_argument("--timing", action="store_true",
                   help="after training, per task the interleaved timer H3 is judged from (bench/overhead.py "
                        "--record into {results_dir}/timing/{backbone}--{task}.json; an existing record is kept)")
    p.add_argument("--until-decided", action="store_true",
                   help="sequential: after --seeds, add the next seed (last + 1) for every task and method until "
                        "every primary verdict is supported or contradicted, or --max-seeds is reached; each look's "
                        "verdicts at the level the spending function allots (src/evaluate.py SEQUENTIAL_RULE)")
    p.add_argument("--max-seeds", type=int, default=None, help="with --until-decided: the most seeds, fixed in advance")
    p.add_argument("--spending", default="obrien-fleming", choices=list(SPENDING_NAMES),
                   help="with --until-decided: the alpha-spending function (default: obrien-fleming)")
    args = p.parse_args(argv)
    if args.until_decided and (args.max_seeds is None or args.max_seeds < len(args.seeds) or len(args.seeds) < 2
                               or len(set(args.seeds)) < len(args.seeds)):
        p.error(f"--until-decided needs --max-seeds >= the number of --seeds ({len(args.seeds)}, at least 2, "
                f"distinct); got --max-seeds {args.max_seeds}")
    if args.max_seeds is not None and not args.until_decided:
        p.error("--max-seeds goes with --until-decided")
    return args


def run_id(method: str, task: str, backbone: str = "MiniLM-L6-22M") -> str:
    return f"{method}-{backbone}--GLUE-{task}"


def _run_layers(path: Path, run_dir: Path) -> list:
    """A run config, after the run configs its own `defaults` list names (a variant written as a delta)."""
    cfg = OmegaConf.load(path)
    bases = [run_dir / f"{entry.split('/')[-1]}.yaml" for entry in cfg.get("defaults") or []
             if isinstance(entry, str) and entry != "_self_"]
    cfg.pop("defaults", None)
    return [layer for base in bases if base.exists() for layer in _run_layers(base, run_dir)] + [cfg]


def run_config(method: str, run_dir: Path = RUN_DIR, suffix: str = DEMO):
    """The run config `{method}-{suffix}` over config.yaml's values, unresolved (no interpolation is needed)."""
    base = OmegaConf.masked_copy(CONFIG, [k for k in CONFIG if k not in ("defaults", "hydra", "trial")])
    return OmegaConf.merge(base, *_run_layers(run_dir / f"{method}-{suffix}.yaml", run_dir))


def adapter_kind(cfg) -> str:
    """'lora', 'adalora', 'glora' or 'eva', by the rule training uses (src.model.adapter_kind): GLoRA is a LoRA
    whose run config has a glo_ra section, EVA one with an eva section."""
    kind = OmegaConf.select(cfg, "model.peft.type", default="lora")
    if kind == "lora" and "glo_ra" in cfg:
        return "glora"
    return "eva" if kind == "lora" and "eva" in cfg else kind


def applies(override: str, kind: str) -> bool:
    """`--set adalora.x=...` reaches the AdaLoRA-type runs only, `glo_ra.x=...` the GLoRA-type runs only,
    `eva.x=...` the EVA runs only."""
    section = override.split(".")[0]
    return {"adalora": kind == "adalora", "glo_ra": kind == "glora", "eva": kind == "eva"}.get(section, True)


def check_matrix(methods: list[str], tasks: list[str], backbone: str, run_dir: Path = RUN_DIR) -> dict:
    """(method, task) -> adapter kind; any missing run config stops the study before anything trains, naming all of
    them and the prefixes that exist for this backbone."""
    missing = [run_id(m, t, backbone) for m in methods for t in tasks
               if not (run_dir / f"{run_id(m, t, backbone)}.yaml").exists()]
    if missing:
        found = sorted({p.name.split(f"-{backbone}--GLUE-")[0] for p in run_dir.glob(f"*-{backbone}--GLUE-*.yaml")})
        sys.exit(f"bench/study.py: no run config {', '.join(f'{r}.yaml' for r in missing)} in {run_dir}. A variant "
                 f"needs one per task, written as a delta on that task's config (defaults: [<base run id>, _self_]; "
                 f"see proposed-params-MiniLM-L6-22M--GLUE-*.yaml); --methods with configs for {backbone}: "
                 f"{' '.join(found)}")
    return {(m, t): adapter_kind(run_config(m, run_dir, f"{backbone}--GLUE-{t}")) for m in methods for t in tasks}


def check_methods(methods: list[str], run_dir: Path = RUN_DIR) -> dict[str, str]:
    """method prefix -> adapter kind, on the SST-2 demo's configs (bench/tuning.py)."""
    kinds = check_matrix(methods, ["SST-2"], "MiniLM-L6-22M", run_dir)
    return {m: kinds[(m, "SST-2")] for m in methods}


def run_folder(results_dir: str | Path, rid: str, seed: int) -> Path:
    """Where the CLI writes one seed of a run: the default seed has no -seed{N} suffix."""
    return Path(results_dir) / (rid if seed == DEFAULT_SEED else f"{rid}-seed{seed}")


@dataclass
class Run:
    method: str
    task: str
    seed: int
    rid: str
    kind: str
    folder: Path

    def state(self) -> tuple[str, int | None]:
        """('done' | 'partial' | 'todo', the newest checkpoint's optimizer step for a partial run)."""
        if (self.folder / "summary.json").exists():
            return "done", None
        steps = [int(p.name.removeprefix("step-")) for p in (self.folder / "checkpoint").glob("step-*")
                 if p.name.removeprefix("step-").isdigit()]
        return ("partial", max(steps)) if steps else (("partial", 0) if self.folder.exists() else ("todo", None))


def matrix(args) -> list[Run]:
    """Every run of the study, seed-major: a study cut short still has whole seeds."""
    kinds = check_matrix(args.methods, args.tasks, args.backbone)
    return [Run(m, t, s, run_id(m, t, args.backbone), kinds[(m, t)],
                run_folder(args.results_dir, run_id(m, t, args.backbone), s))
            for s in args.seeds for t in args.tasks for m in args.methods]


def cli_args(run: Run, args, mode: str = "full", results_dir: str | None = None) -> list[str]:
    """The contract CLI's arguments for one run."""
    out = [f"run={run.rid}", f"results_dir={results_dir or args.results_dir}", f"mode={mode}",
           "wandb.mode=disabled", *([f"seed={run.seed}"] if mode == "full" else []),
           *[o for o in args.set if applies(o, run.kind)]]
    out += [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    out += [f"model.backbone={args.model}"] if args.model else []
    return out


def forecast(run: Run, args) -> float | None:
    """The full run's wall time forecast by a trial run of its config on this device (kept in {results_dir}/.plan/
    and reused; delete that folder to measure again)."""
    plan_dir = Path(args.results_dir) / ".plan"
    summary = plan_dir / run.rid / "summary.json"
    if not summary.exists():
        print(f"[study] forecasting {run.rid} (a trial run)", flush=True)
        proc = subprocess.run([sys.executable, "-u", "-m", "src.main", *cli_args(run, args, "trial", str(plan_dir))],
                              cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            print(f"[study] the trial run of {run.rid} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            return None
    return json.loads(summary.read_text()).get("forecast_full_run_s")


def remaining_share(run: Run, forecast_s: float | None, step: int | None, args) -> float:
    """The share of a run still to train: 1 for a new run, 1 - step/total for a partial one."""
    if not step:
        return 1.0
    shape = json.loads((Path(args.results_dir) / ".plan" / run.rid / "summary.json").read_text()).get(
        "forecast_full_run_shape", {}) if forecast_s else {}
    total = shape.get("total_steps")
    return max(0.0, 1 - step / total) if total else 1.0


def overrun(runs: list[Run], forecasts: dict[str, float | None]) -> dict[str, list[float]]:
    """Per task, finished runs' measured time (train + evaluation, from summary.json) over their forecast."""
    ratios: dict[str, list[float]] = {}
    for r in runs:
        if forecasts.get(r.rid) and r.state()[0] == "done":
            s = json.loads((r.folder / "summary.json").read_text())
            if s.get("train_time_s") is not None:
                ratios.setdefault(r.task, []).append((s["train_time_s"] + s.get("eval_time_s", 0.0)) / forecasts[r.rid])
    return ratios


def task_overrun(ratios: dict[str, list[float]], task: str) -> float:
    """The median measured/forecast ratio of a task's finished runs; of every task's while it has none; else 1."""
    return statistics.median(ratios.get(task) or [x for xs in ratios.values() for x in xs] or [1.0])


def hms(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def study_trials(results_dir: str | Path, rid: str) -> int:
    """Finished (complete or pruned) trials of a run config's shared Optuna study ({results_dir}/optuna/{rid}/)."""
    db = Path(results_dir) / "optuna" / rid / "study.db"
    if not db.exists():
        return 0
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=rid, storage=f"sqlite:///{db.resolve()}")
    except KeyError:  # the file exists, the study was never created in it
        return 0
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))


def tune_phase(runs: list[Run], args) -> dict[str, tuple[int, int, float | None]]:
    """rid -> (trials finished, trials planned, forecast of one trial) for every config that tunes (optuna.n_trials
    > 0 with mode=full, as its run config and --set give it): its study runs once, in the first seed that trains it,
    and every later seed reuses it. The forecast comes from the config's trial run, when one ran."""
    out = {}
    for r in {r.rid: r for r in runs}.values():
        planned = int(config_of(r, args).optuna.n_trials or 0)  # --set included
        summary = Path(args.results_dir) / ".plan" / r.rid / "summary.json"
        if planned:
            out[r.rid] = (study_trials(args.results_dir, r.rid), planned,
                          json.loads(summary.read_text()).get("forecast_trial_s") if summary.exists() else None)
    return out


def config_of(run: Run, args):
    """A run's config (its run config over config.yaml, unresolved) with the --set overrides that reach it."""
    cfg = run_config(run.method, suffix=f"{args.backbone}--GLUE-{run.task}")
    for o in args.set:
        if applies(o, run.kind):
            key, value = o.split("=", 1)
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)  # "16" -> 16
    return cfg


def plan(runs: list[Run], args) -> float:
    """Print every run with its state and the forecast of what is left; returns the seconds left (forecast). With
    --gpu-check: the GPU forecast from its rates instead of trial runs here."""
    if args.gpu_check:
        rates = json.loads(Path(args.gpu_check).read_text())
        return print_gpu_forecast(runs, args, rates, gpus=forecast_gpus(args))
    forecasts, failed = {}, {}
    for r in {r.rid: r for r in runs}.values():
        if r.task in failed:  # its data and backbone are those that failed: say so once, not once per config
            forecasts[r.rid] = None
            continue
        forecasts[r.rid] = forecast(r, args)
        if forecasts[r.rid] is None:
            failed[r.task] = r.rid
            print(f"[study] no trial runs for {r.task}'s other configs (the same data and backbone); "
                  f"bench/gpu_check.py's rates forecast without them: --gpu-check FILE", flush=True)
    left, scaled, unknown = 0.0, 0.0, []
    ratios = overrun(runs, forecasts)
    tuning = tune_phase(runs, args)
    if tuning:  # the tune phase: one study per config, before its first seed's run
        print(f"\n{'tune (one study per config, shared by its seeds)':<58} {'trials':>9} {'forecast':>14}")
        for rid, (done, planned, per_trial) in tuning.items():
            rest = None if per_trial is None else (planned - done) * per_trial
            if rest is not None:
                left += rest
                scaled += rest * task_overrun(ratios, next(r.task for r in runs if r.rid == rid))
            print(f"{rid:<58} {done:>4}/{planned:<4} {'-' if rest is None else hms(rest):>14}")
    print(f"\n{'run':<58} {'seed':>5} {'state':<14} {'forecast':>10}")
    for r in runs:
        state, step = r.state()
        f = forecasts[r.rid]
        label = state if step is None else f"{state} @{step}"
        if state != "done":
            if f is None:
                unknown.append(r.folder.name)
            else:
                share = f * remaining_share(r, f, step, args)
                left += share
                scaled += share * task_overrun(ratios, r.task)
        print(f"{r.rid:<58} {r.seed:>5} {label:<14} {'-' if f is None else hms(f):>10}")
    done = sum(r.state()[0] == "done" for r in runs)
    trials_left = sum(planned - finished for finished, planned, _ in tuning.values())
    head = (f"\n{len(runs)} runs: {done} done, {len(runs) - done} left"
            f"{f', and {trials_left} tuning trials' if trials_left else ''}; ")
    if unknown and len(unknown) == len(runs) - done:  # nothing forecast: not "0 min"
        print(head + "no forecast on this device (its trial runs failed, above); bench/gpu_check.py's rates "
              "forecast from anywhere: --gpu-check FILE")
    else:
        print(head + f"forecast for what is left: {hms(left)} on this device, one run at a time"
              f"{f' (no forecast for {len(unknown)} runs)' if unknown else ''}")
    print("(forecasts come from trial runs in {}/.plan/; a machine busy with other work inflates them)"
          .format(args.results_dir))
    if ratios and left:  # overrun lists only tasks with a finished run
        per_task = ", ".join(f"{t} {statistics.median(xs):.2f} ({len(xs)})" for t, xs in ratios.items())
        print(f"finished runs' train + evaluation time over their forecast, median per task (runs): {per_task}; "
              f"scaled by its task's ratio (all tasks' where it has none), what is left takes about {hms(scaled)}")
    return left


def phase_steps(kind: str, cfg, total: int) -> dict[str, int]:
    """A run's `total` optimizer steps per cost regime bench/gpu_check.py times, in order (cfg's schedules resolved
    to steps): GLoRA's warm-up (scores kept) and after it; AdaLoRA's budgeting (importance every step, masks every
    mask_interval) and its final phase at fixed ranks; one phase otherwise."""
    if kind == "glora":
        warm = min(total, cfg.glo_ra.warmup_steps)
        return {"warm-up": warm, "after": total - warm}
    if kind == "adalora":
        final = min(total, cfg.adalora.final_steps)
        return {"budgeting": total - final, "final": final}
    return {"train": total}


def phase_shares(kind: str, cfg, total: int) -> dict[str, float]:
    """Each phase's share of the run's steps (phase_steps)."""
    return {p: n / total for p, n in phase_steps(kind, cfg, total).items()}


def forecast_gpus(args) -> int:
    """The GPUs a GPU forecast spreads the runs over: --gpus N, else the visible ones, else 1."""
    if args.gpus != "auto":
        return max(1, int(args.gpus))
    import torch

    return max(1, torch.cuda.device_count())


def gpu_run_seconds(run: Run, args, rates: dict, tuning: bool) -> tuple[float | None, dict | str]:
    """One run's (tuning: one Optuna trial's) forecast seconds on the gpu_check's device, and its shape; or None and
    why not. Steps and evaluations from the config and the task's split sizes, padded tokens per step from the
    task's length sample, seconds per padded token per phase from the method's timed steps, weighted by the
    run's share of steps in each phase."""
    from src import train as T

    task, method = rates.get("tasks", {}).get(run.task), rates.get("methods", {}).get(run.kind)
    if task is None:
        return None, f"no sizes or lengths of {run.task} (bench/gpu_check.py --tasks ... {run.task})"
    if method is None:
        return None, f"no {run.kind} rates (bench/gpu_check.py --runs ... with the {run.kind} config)"
    cfg = config_of(run, args)
    train_lengths, eval_lengths = (np.array(task[k]) for k in ("train_lengths", "eval_lengths"))
    n_eval = {k: v for k, v in task["sizes"].items() if k != "train"}
    shape = T.run_shape(cfg, task["sizes"]["train"], n_eval, tuning, train_lengths, eval_lengths)
    d, t = cfg.dataset, cfg.training
    train = min(task["sizes"]["train"], d.max_train_samples or task["sizes"]["train"])
    per_epoch = math.ceil(T.batches_per_epoch(math.ceil(train / d.batch_size), t) / t.gradient_accumulation_steps)
    full = T.run_shape(cfg, task["sizes"]["train"], n_eval)  # a trial's phases are the run's, compressed
    resolved, _ = T.resolve_schedules(cfg, full.total_steps, per_epoch)
    shares = phase_shares(run.kind, resolved, full.total_steps)
    missing = [p for p in shares if p not in method["phases"]]
    if missing:
        return None, f"no {run.kind} rate for its {', '.join(missing)} phase"
    step_rate = sum(share * method["phases"][p]["step_s_per_token"] for p, share in shares.items())
    setup = rates.get("load_s", 0.0) + method.get("init_s", 0.0) + (method.get("reallocation_s") or 0.0)
    seconds = T.forecast_seconds(shape, {"step_s_per_token": step_rate, "eval_s_per_token": method["eval_s_per_token"],
                                         "tokenize_s_per_example": 0.0}, setup)  # tokenising: once per task
    return seconds, {"steps": shape.total_steps, "evaluations": shape.evaluations, "step_tokens": shape.step_tokens}


def gpu_tokenize_seconds(task: str, rates: dict) -> float:
    """Tokenising a task's splits once: the first trial or run writes the token cache (keyed by the files, the
    tokenizer and max_length, so every method's trials and seeds of the task read it)."""
    t = rates["tasks"][task]
    return t["tokenize_s_per_example"] * sum(t["sizes"].values())


@dataclass
class Job:
    """One run of the queue as the node forecast sees it: its config (whose study its seeds share), its task and its
    own seconds (training, and the task's tokenising for its first job)."""
    name: str
    config: str
    task: str
    seconds: float


def schedule_node(jobs: list[Job], slots: int, studies: dict[str, tuple[int, float]] | None = None) -> float:
    """Wall seconds of the queue `jobs` (in order) on `slots` GPUs, as bench/study.py and src.main run it: a job
    starts on the first GPU free; while its config's study (`studies`: config -> (trials left, seconds a trial)) has
    trials left, it is one of the study's Optuna workers and runs one trial after another; once none is left it waits
    for the study's running trials (the best values need them all), then trains."""
    studies = {c: [n, sec, 0] for c, (n, sec) in (studies or {}).items()}  # trials left, seconds, running
    events: list[tuple[float, int, str, int, Job]] = []  # (time, tie-break, kind, slot, job)
    order, queue_ = itertools.count(), list(jobs)
    waiting: dict[str, list[tuple[int, Job]]] = {}
    end = 0.0

    def step(t: float, slot: int, job: Job) -> None:  # the job's next move at time t
        study = studies.get(job.config)
        if study and study[0] > 0:
            study[0] -= 1
            study[2] += 1
            heapq.heappush(events, (t + study[1], next(order), "trial", slot, job))
        elif study and study[2] > 0:
            waiting.setdefault(job.config, []).append((slot, job))
        else:
            heapq.heappush(events, (t + job.seconds, next(order), "done", slot, job))

    def take(t: float, slot: int) -> None:
        if queue_:
            step(t, slot, queue_.pop(0))

    for slot in range(max(1, slots)):
        take(0.0, slot)
    while events:
        t, _, kind, slot, job = heapq.heappop(events)
        end = max(end, t)
        if kind == "trial":
            study = studies[job.config]
            study[2] -= 1
            if study[0] == 0 and study[2] == 0:  # the study is finished: its waiting workers train
                for other_slot, other in waiting.pop(job.config, []):
                    heapq.heappush(events, (t + other.seconds, next(order), "done", other_slot, other))
            step(t, slot, job)
        else:
            take(t, slot)
    return end


def print_gpu_forecast(runs: list[Run], args, rates: dict, gpus: int) -> float:
    """The study's tune phase and seeds in GPU-hours on the gpu_check's device, what is left only; returns its
    GPU-seconds. The wall time: the queue (seed-major, as `train` runs it) on the node, a config's seeds running its
    study's trials as its Optuna workers before they train (schedule_node); an upper bound in that every trial runs
    to its budget (pruning aside)."""
    env = rates.get("environment", {})
    noun = "GPU" if env.get("device") == "cuda" else env.get("device", "device").upper()  # a CPU check: CPU-hours
    unit = f"{noun}-hours"
    precisions = sorted({m.get("precision", "?") for m in rates.get("methods", {}).values()})
    print(f"forecast from {args.gpu_check}: {env.get('device_name', '?')} ({rates.get('backbone')}, torch "
          f"{env.get('torch')}, {'/'.join(precisions)}); rates measured on {rates.get('checked_task')}'s batches, "
          f"other tasks per padded token")
    for name, t in rates.get("tasks", {}).items():
        if name in args.tasks and not t["source"].startswith("files"):
            print(f"  {name}: sizes from the official split table, lengths from {t['source']}")
    tuning = tune_phase(runs, args)
    total, jobs, unknown, studies, counted = 0.0, [], [], {}, {"trials": 0, "runs": 0}
    # tokenising, once per task not begun (a task with a trial or a run begun has its token cache already): charged
    # to the task's first job in the queue
    started = {r.task for r in runs if r.state()[0] != "todo"} | {
        next(r.task for r in runs if r.rid == rid) for rid, (finished, _, _) in tuning.items() if finished}
    tokenized = {t: gpu_tokenize_seconds(t, rates) for t in dict.fromkeys(r.task for r in runs)
                 if t not in started and t in rates.get("tasks", {})}
    total += sum(tokenized.values())

    if tuning:
        print(f"\n{'tune (one study per config, shared by its seeds)':<58} {'trials':>9} {'steps/trial':>11} "
              f"{unit:>10}")
    for rid, (finished, planned, _) in tuning.items():
        run = next(r for r in runs if r.rid == rid)
        per_trial, shape = gpu_run_seconds(run, args, rates, tuning=True)
        if per_trial is None:
            unknown.append(f"{rid} tuning: {shape}")
            print(f"{rid:<58} {finished:>4}/{planned:<4} {'-':>11} {'-':>10}")
            continue
        rest = (planned - finished) * per_trial
        total += rest
        studies[rid] = (planned - finished, per_trial)
        counted["trials"] += planned - finished
        print(f"{rid:<58} {finished:>4}/{planned:<4} {shape['steps']:>11} {rest / 3600:>10.2f}")
    print(f"\n{'run':<58} {'seed':>5} {'state':<14} {'steps':>8} {unit:>10}")
    per_config = {}  # every seed of a config has the same forecast: computed once
    for r in runs:
        state, step = r.state()
        if r.rid not in per_config:
            per_config[r.rid] = gpu_run_seconds(r, args, rates, tuning=False)
        seconds, shape = per_config[r.rid]
        if seconds is None:
            unknown.append(f"{r.rid}: {shape}")
        elif state != "done":  # a partial run resumes from its newest checkpoint: the steps after it are left
            seconds = seconds * max(0.0, 1 - (step or 0) / shape["steps"])
            total += seconds
            counted["runs"] += 1
            first = r.task in tokenized and not any(j.task == r.task for j in jobs)
            jobs.append(Job(r.folder.name, r.rid, r.task, seconds + (tokenized[r.task] if first else 0.0)))
        label = state if not step else f"{state} @{step}"
        print(f"{r.rid:<58} {r.seed:>5} {label:<14} {shape['steps'] if seconds else '-':>8} "
              f"{'-' if seconds is None else f'{seconds / 3600:.2f}':>10}")
    wall = schedule_node(jobs, gpus, studies)
    trials = sum(p - f for f, p, _ in tuning.values())
    left = sum(r.state()[0] != "done" for r in runs)
    print(f"\nwhat is left: {trials} tuning trials and {left} runs; the {counted['trials']} trials and "
          f"{counted['runs']} runs with rates: {total / 3600:.1f} {unit}, on {gpus} {noun}{'s' if gpus > 1 else ''} "
          f"of this kind about {wall / 3600:.1f} h wall (the queue in this order, a job on the first free "
          f"{noun}; a config's seeds are its study's workers, a trial each at a time, then train; pruning aside)")
    if tokenized:
        print("tokenising, once per task (the token cache serves every later trial, seed and method): "
              + ", ".join(f"{t} {hms(sec)}" for t, sec in tokenized.items()))
    if args.runs_per_gpu > 1:
        print(f"--runs-per-gpu {args.runs_per_gpu}: no gain from sharing a GPU is assumed (gpu_check does not "
              f"measure one); each run's peak memory is in its table")
    if unknown:
        print(f"no forecast for {len(unknown)}: " + "; ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else ""))
    return total


def gpu_count(args, runs: list[Run]) -> int:
    """How many runs go at once: one per GPU when several are visible and the runs are not on the CPU."""
    if args.gpus != "auto":
        return int(args.gpus)
    devices = {str(OmegaConf.select(run_config(r.method, suffix=f"{args.backbone}--GLUE-{r.task}"),
                                    "hardware.device")) for r in runs}
    devices |= {o.split("=", 1)[1] for o in args.set if o.startswith("hardware.device=")}
    if devices <= {"cpu"} or any(o == "hardware.device=cpu" for o in args.set):
        return 0
    import torch  # only here: a CPU study never needs CUDA initialised in this process
    n = torch.cuda.device_count()
    return n if n > 1 or (n == 1 and args.runs_per_gpu > 1) else 0


def visible_gpus(n: int) -> list[str]:
    """The GPU ids a worker may pin a run to: CUDA_VISIBLE_DEVICES' own list when set, else 0..n-1."""
    given = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (given or [str(i) for i in range(n)])[:n]


class Progress:
    """Runs done / left, elapsed, projected end. A run's expected wall: its config's measured walls in this
    invocation; else its forecast scaled by the median measured/forecast ratio so far of its task, or of every task
    while its own has none (as --plan scales; trial runs of 1-2 steps can be off by 20-25% on long-sequence tasks);
    else its forecast; else the median measured wall."""

    def __init__(self, runs: list[Run], forecasts: dict[str, float | None], workers: int):
        self.total, self.forecasts, self.workers = len(runs), forecasts, max(1, workers)
        self.start, self.walls, self.lock = time.time(), {}, threading.Lock()
        self.task = {r.rid: r.task for r in runs}
        self.done = sum(r.state()[0] == "done" for r in runs)

    def expected(self, run: Run) -> float | None:
        if run.rid in self.walls:
            return statistics.median(self.walls[run.rid])
        ratios: dict[str, list[float]] = {}
        for rid, ws in self.walls.items():
            if self.forecasts.get(rid):
                ratios.setdefault(self.task[rid], []).extend(w / self.forecasts[rid] for w in ws)
        if self.forecasts.get(run.rid):
            return self.forecasts[run.rid] * task_overrun(ratios, run.task)
        measured = [w for ws in self.walls.values() for w in ws]
        return statistics.median(measured) if measured else None

    def line(self, left: list[Run]) -> str:
        elapsed = time.time() - self.start
        guesses = [self.expected(r) for r in left]
        known = [g for g in guesses if g is not None]
        end = "" if not known else (f", projected end {time.strftime('%H:%M', time.localtime(time.time() + sum(known) / self.workers))}"
                                    f"{'' if len(known) == len(guesses) else ' (some runs unforecast)'}")
        return f"{self.done}/{self.total} done, {len(left)} left, elapsed {hms(elapsed)}{end}"

    def finished(self, run: Run, wall: float) -> None:
        with self.lock:
            self.walls.setdefault(run.rid, []).append(wall)
            self.done += 1


def train(runs: list[Run], args) -> list[str]:
    """Train every run that has not finished; returns the failed runs' folder names."""
    todo = [r for r in runs if r.state()[0] != "done"]
    for r in runs:
        if r not in todo:
            print(f"[study] {r.folder.name}: finished earlier, skipped", flush=True)
    if not todo:
        return []
    cached = {r.rid: json.loads(p.read_text()).get("forecast_full_run_s")
              for r in todo if (p := Path(args.results_dir) / ".plan" / r.rid / "summary.json").exists()}
    gpus = gpu_count(args, runs)
    if args.runs_per_gpu < 1:
        sys.exit("bench/study.py: --runs-per-gpu must be 1 or more")
    workers = gpus * args.runs_per_gpu
    progress = Progress(runs, cached, workers)
    pending: queue.Queue = queue.Queue()
    for r in todo:
        pending.put(r)
    failed: list[str] = []

    def worker(gpu: str | None) -> None:
        while True:
            try:
                r = pending.get_nowait()
            except queue.Empty:
                return
            with progress.lock:
                left = [r, *list(pending.queue)]
                print(f"[study] {r.folder.name}{f' on GPU {gpu}' if gpu else ''} ({r.state()[0]}): "
                      f"{progress.line(left)}", flush=True)
            cmd = [sys.executable, "-u", "-m", "src.main", *cli_args(r, args)]
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
            start = time.perf_counter()
            if gpu:  # parallel runs: their progress bars would interleave, so each writes a log
                log = Path(args.results_dir) / ".logs" / f"{r.folder.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as fh:
                    code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
            else:
                print(f"[study] {' '.join(cmd[2:])}", flush=True)
                code = subprocess.run(cmd, cwd=REPO, env=env).returncode
            if code:
                with progress.lock:
                    failed.append(r.folder.name)
                print(f"[study] {r.folder.name} failed (exit {code}); the others go on", flush=True)
            else:
                progress.finished(r, time.perf_counter() - start)

    slots = [g for g in visible_gpus(gpus) for _ in range(args.runs_per_gpu)] if gpus else [None]
    threads = [threading.Thread(target=worker, args=(g,)) for g in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"[study] {progress.line([])}", flush=True)
    return failed


def csv_rows(runs: list[Run]) -> list[dict]:
    """One row per finished run: the task's headline metric (its number in the GLUE average) and the cost."""
    rows = []
    for r in runs:
        path = r.folder / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        metric = s["glue_metric"] if s.get("glue_metric") in s else "glue_score"  # MNLI m/mm and QQP acc/F1 means
        step = s.get("step_time_s") or {}
        rows.append({"task": r.task, "method": r.method, "method_name": s["method_name"], "seed": s["seed"],
                     "metric": metric, "value": s[metric], "train_time_s": s["train_time_s"],
                     "step_time_median_s": step.get("median"), "trainable_params": s["trainable_params"],
                     "adapter_params": s["adapter_params"], "rank_total": s["rank_budget_total"],
                     "adapter_params_effective": s.get("adapter_params_effective"),
                     "eval_time_s": s.get("eval_time_s"), "resumes": s.get("resumes"), "run": r.folder.name,
                     "steps": s.get("total_steps")})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else ""
    return f"{stat['mean'] * scale:.{digits}f}{std}"


def fmt_ratio(ratio: dict | None) -> str:
    """A time ratio object: `1.23` or `1.23 n/c` (not comparable: the reason is in report.md)."""
    if not ratio or ratio.get("value") is None:
        return "-"
    return f"{ratio['value']:.2f}" + ("" if ratio["comparable"] else " n/c")


def print_paper_table(rows: list[dict], tasks: list[str], methods: list[str]) -> None:
    """The AdaLoRA paper's layout from the CSV rows: tasks as columns (headline metric x 100, mean ± std over seeds),
    methods as rows, the GLUE average of the task means last (on the tasks a method has)."""
    cells = {(r["method"], r["task"]): [] for r in rows}
    for r in rows:
        cells[(r["method"], r["task"])].append(100 * r["value"])
    names = {r["method"]: r["method_name"] for r in rows}
    metric = {r["task"]: r["metric"] for r in rows}
    width = max([22, *(len(n) for n in names.values())])
    print(f"\n{'method':<{width}} " + " ".join(f"{t + ' (' + metric.get(t, '-') + ')':>18}" for t in tasks)
          + f" {'average':>9}")
    for m in methods:
        vals = [cells.get((m, t)) for t in tasks]
        text = [("-" if not v else f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1
                                                                    else "") + f" ({len(v)})") for v in vals]
        means = [statistics.mean(v) for v in vals if v]
        avg = f"{statistics.mean(means):.2f}" + ("" if len(means) == len(tasks) else "*") if means else "-"
        print(f"{names.get(m, m):<{width}} " + " ".join(f"{c:>18}" for c in text) + f" {avg:>9}")
    print("(mean ± std over seeds (n); * = average over fewer tasks than the table has)")


def print_table(agg: dict) -> None:
    width = max(8, *(len(m) for g in agg["groups"].values() for m in g))
    head = f"{'task':<6} {'method':<{width}} {'n':>2} {'glue_score (%)':>14} {'train time (s)':>16} " \
           f"{'step ratio':>10} {'trainable':>10} {'rank total':>10} {'adapter':>9} {'vs LoRA (points)':>16}"
    print(head + "\n" + "-" * len(head))
    for task, by_method in agg["groups"].items():
        for method, g in by_method.items():
            d = agg["derived"][task].get("methods", {}).get(method, {})
            gain = d.get("glue_score_gain_abs", d.get("accuracy_gain_abs"))
            print(f"{task:<6} {method:<{width}} {g['n']:>2} {fmt(g.get('glue_score'), 100):>14} "
                  f"{fmt(g['train_time_s'], digits=1):>16} {fmt_ratio(d.get('step_time_ratio')):>10} "
                  f"{fmt(g['trainable_params'], digits=0):>10} {fmt(g['rank_budget_total'], digits=0):>10} "
                  f"{fmt(g['adapter_params_reported'], digits=0):>9} "
                  f"{'' if gain is None else f'{100 * gain:+.2f}':>16}")
    print("(adapter: parameters at the final ranks where recorded; step ratio: median step time vs LoRA, "
          "n/c = not comparable, see report.md; a tuned group's points are over tuned LoRA)")
    for task, d in agg["derived"].items():
        for label, block in (("", d), (" (tuned groups)", d.get("tuned"))):
            if block is None:
                continue
            share = (block.get("glora_share_of_adalora_gain") or {}).get("glue_score") or {}
            value = "-" if share.get("value") is None else f"{share['value']:.2f}"
            reason = f" ({share['reason']})" if share.get("reason") else ""
            print(f"{task}{label}: share of AdaLoRA's glue_score gain recovered by GLoRA: {value}{reason}")
    print("\nacross seeds (glue_score paired by seed):")
    for e in agg["significance"]["seed_level"]:
        print_seed_level(e, f"{e['method_a']} - {e['method_b']}")
    print("per example on the dev set (McNemar exact, Holm over a pair's seeds; paired bootstrap 95% CI of the "
          "accuracy difference):")
    for e in agg["significance"]["example_level"]:
        if "mcnemar" not in e:
            print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e.get('reason')}")
            continue
        bs = e["bootstrap"]
        ci = "-" if bs["ci_low"] is None else f"[{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}]"
        print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e['paired_by']:<8} n = {e['n']}  "
              f"diff {100 * bs['difference']:+.2f}  CI {ci}  McNemar p = {e['mcnemar']['p_value']:.2g} "
              f"(Holm {e['mcnemar']['p_adjusted']:.2g})")


def print_seed_level(e: dict, pair: str) -> None:
    """One seed-level comparison: mean difference and its interval, both tests' p (raw; Holm within the family),
    the MDE, the seeds the hypothesis' margin needs and the reading."""
    diff = "-" if e["mean_difference"] is None else f"{100 * e['mean_difference']:+.2f}"
    ci = "-" if not e.get("ci") else f"[{100 * e['ci'][0]:+.2f}, {100 * e['ci'][1]:+.2f}]"
    p = ["-" if t.get("p_value") is None else f"{t['p_value']:.4f} (Holm {t['p_adjusted']:.4f})" for t in e["tests"]]
    p += ["-"]
    mde = "-" if e["mde"]["mde"] is None else f"{100 * e['mde']['mde']:.2f} points"
    needed = e["mde"]["seeds_needed_for_margin"]
    print(f"  {e['task']:<6} {pair:<34} diff {diff:>6} points {ci}  t-test p = {p[0]}  Wilcoxon p = {p[1]}  "
          f"(n = {e['n']})  MDE {mde}  seeds for the margin {needed or '-'}: {e['reading']}")


def print_ablation(agg: dict) -> None:
    """Every variant/control against LoRA and GLoRA, with what it spent."""
    if not agg.get("ablation"):
        return
    print("\nablation and controls (glue_score paired by seed; Holm over each task's table; MDE at power 0.8; "
          "budget vs LoRA):")
    for entry in agg["ablation"]:
        b = entry["budget"]
        ratio = "-" if b["adapter_params_ratio"] is None else f"{b['adapter_params_ratio']:.3f}"
        print(f"  {entry['task']:<6} {entry['method_name']}: variant {entry['variant'] or '-'}, rank total "
              f"{fmt({'mean': b['rank_budget_total']}, digits=0)}, adapter params "
              f"{fmt({'mean': b['adapter_params']}, digits=0)} (x{ratio} of LoRA)")
        for c in entry["comparisons"]:
            if c["against"] is None:
                print(f"    vs {c['role']}: {c['reason']}")
                continue
            s = c["example_summary"]
            print_seed_level(c["seed_level"], f"{entry['method_name']} - {c['against']}")
            print(f"  {'':<6} {'':<34} per seed: McNemar p < 0.05 in {s['n_mcnemar_significant']}/{s['n_tests']} "
                  f"({s['n_mcnemar_significant_adjusted']} after Holm over the seeds)")


def print_verdict(agg: dict) -> None:
    """The hypotheses' verdicts (report.md opens with them, with the rule and what they cannot say)."""
    print("\nverdict (config/hypotheses.yaml; rule and scope in report.md):")
    for e in agg["hypotheses"]:
        ci = "-" if not e["ci"] else f"[{e['ci'][0]:.4g}, {e['ci'][1]:.4g}]"
        estimate = "-" if e["estimate"] is None else f"{e['estimate']:.4g}"
        print(f"  {e['id']:<4} {e['task']:<12} {estimate:>9} {ci:<20} margin {e['margin']:g}  n = {e['n']}  "
              f"{e['status']}" + (f" ({e['reason']})" if e["reason"] else ""))


def evaluate(runs: list[Run], args, extra: tuple[str, ...] = ()) -> tuple[list[Run], dict]:
    """src.evaluate over every config with a finished run (`extra`: more of its arguments); (the finished runs,
    its aggregated_metrics.json)."""
    finished = [r for r in runs if r.state()[0] == "done"]
    missing = [r.folder.name for r in runs if r not in finished]
    if missing:
        print(f"[study] not finished, left out of the report: {' '.join(missing)}", flush=True)
    ids = list(dict.fromkeys(r.rid for r in finished))
    if not ids:
        sys.exit("bench/study.py: no finished run to evaluate")
    if not any(x.startswith("seeds=") for x in extra):  # the study's seeds only, as its CSV: not others in the folder
        extra = (f"seeds={json.dumps(sorted({r.seed for r in finished}))}", *extra)
    if subprocess.run([sys.executable, "-m", "src.evaluate", f"results_dir={args.results_dir}",
                       f"run_ids={json.dumps(ids)}", *extra], cwd=REPO).returncode:
        sys.exit("bench/study.py: src.evaluate failed (its error is above)")
    return finished, json.loads((Path(args.results_dir) / "comparison" / "aggregated_metrics.json").read_text())


def timing_command(args, task: str, methods: list[str], allocation: Path | None, record: Path) -> list[str]:
    """bench/overhead.py's command for one task's timing record (LoRA, AdaLoRA, GLoRA prefixes in that order)."""
    return [sys.executable, "bench/overhead.py", "--task", task, "--backbone", args.backbone, "--methods", *methods,
            "--record", str(record), *(["--allocation", str(allocation)] if allocation else []),
            *(["--data-dir", args.data_dir] if args.data_dir else []), *(["--model", args.model] if args.model else []),
            *(["--set", *args.set] if args.set else [])]


def timing(runs: list[Run], args) -> list[str]:
    """The study's timing phase (--timing): per task, bench/overhead.py --record on its LoRA, AdaLoRA and GLoRA configs
    (the first of each kind among --methods without a variant), GLoRA's allocation from its first finished run of the
    task (else its warm-up), into the path src.evaluate reads. A task whose record exists is kept (delete it to time
    again). Returns the tasks whose timing failed."""
    from src.evaluate import timing_record_path  # where src.evaluate reads the records

    failed = []
    for task in args.tasks:
        record = timing_record_path(args.results_dir, args.backbone, task)
        if record.exists():
            print(f"[study] timing {task}: {record} exists, kept", flush=True)
            continue
        mine, chosen = [r for r in runs if r.task == task], {}
        for r in mine:
            if r.kind not in chosen and run_config(r.method, suffix=f"{args.backbone}--GLUE-{task}").get(
                    "variant") is None:
                chosen[r.kind] = r.method
        if not {"lora", "adalora", "glora"} <= set(chosen):
            print(f"[study] timing {task}: needs a LoRA, an AdaLoRA and a GLoRA config among --methods "
                  f"(found {chosen}); skipped", flush=True)
            continue
        allocation = next((r.folder for r in mine if r.method == chosen["glora"]
                           and (r.folder / "rank_allocation.json").exists()), None)
        cmd = timing_command(args, task, [chosen[k] for k in ("lora", "adalora", "glora")], allocation, record)
        print(f"[study] timing {task}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode:
            failed.append(f"timing-{task}")
    return failed


def report(runs: list[Run], args) -> int:
    """src.evaluate over every config with a finished run, the per-run CSV, the tables."""
    print_report(*evaluate(runs, args), args)
    return 0


def print_report(finished: list[Run], agg: dict, args) -> None:
    """The per-run CSV and the tables of one evaluation."""
    rows = csv_rows(finished)
    path = Path(args.csv or Path(args.results_dir) / f"study-{args.backbone}.csv")
    write_csv(path, rows)
    print_paper_table(rows, args.tasks, args.methods)
    print()
    print_table(agg)
    print_ablation(agg)
    print_verdict(agg)
    print(f"\nper-run table: {path} ({len(rows)} runs); report: {args.results_dir}/comparison/report.md")


# Sequential (--until-decided): a look after every added seed; the rule is src.evaluate's (SEQUENTIAL_RULE).

def look_overrides(seeds: list[int], args) -> tuple[str, ...]:
    """src.evaluate's arguments for the look at these seeds: only their runs, at the level this look is allotted."""
    seq = {"look_n": len(seeds), "first_look": len(args.seeds), "max_seeds": args.max_seeds,
           "spending": args.spending}
    return (f"seeds={json.dumps(seeds)}", *(f"statistics.sequential.{k}={v}" for k, v in seq.items()))


def primary_verdicts(agg: dict) -> list[dict]:
    """The primary entries of `hypotheses`: each hypothesis' GLUE average, or its one task's verdict."""
    return [e for e in agg.get("hypotheses", []) if e.get("primary")]


def look_line(seeds: list[int], agg: dict, args) -> str:
    """One line per look: n, each primary verdict, the level."""
    primary = primary_verdicts(agg)
    seq = next((e["sequential"] for e in primary if e.get("sequential")), None) or {}
    level = "" if not seq else (f", intervals at {100 * (1 - seq['alpha_this_look']):.4g}% (α this look "
                                f"{seq['alpha_this_look']:.4g}, spent {seq['alpha_spent']:.4g} of {seq['alpha']:g})")
    verdicts = ", ".join(f"{e['id']} {e['status']}" for e in primary) or "no primary verdict"
    return (f"[study] look {len(seeds) - len(args.seeds) + 1} of at most {args.max_seeds - len(args.seeds) + 1}: "
            f"n = {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}){level}: {verdicts}")


def until_decided(args) -> tuple[list[Run], list[str], dict | None]:
    """Train and evaluate --seeds, then add the next seed for every task and method until every primary verdict is
    decided or --max-seeds is reached. Re-running recomputes the looks made from the finished seeds and goes on.
    Returns (the last complete look's runs, the failed runs, its aggregated metrics or None when none was made)."""
    seeds, done, agg, failed = list(args.seeds), [], None, []
    while True:
        runs = matrix(argparse.Namespace(**{**vars(args), "seeds": seeds}))
        new = [r for r in runs if r.seed not in {d.seed for d in done}]
        failed += [] if args.no_train else train(new, args)
        failed += timing(runs, args) if args.timing and not done else []  # per task, once: not per seed
        unfinished = [r.folder.name for r in new if r.state()[0] != "done"]
        if unfinished:  # a look needs every run of its seeds
            print(f"[study] look at n = {len(seeds)}: {len(unfinished)} runs not finished ({' '.join(unfinished)}); "
                  f"the looks stop here", flush=True)
            return done, failed, agg
        done, agg = evaluate(runs, args, look_overrides(seeds, args))
        print(look_line(seeds, agg, args), flush=True)
        primary = primary_verdicts(agg)
        # a decided verdict is kept (src.evaluate recomputes the earlier looks: `sequential_decision`); "not testable"
        # is settled too: its reason (AdaLoRA's gain shown <= 0, incomparable step times) does not go away with more
        # seeds, so waiting for it would only run the study to --max-seeds
        settled = all(e.get("sequential_decision") or e["status"] == "not testable" for e in primary)
        if not primary or settled or len(seeds) >= args.max_seeds:
            why = ("no primary verdict (no task has the hypotheses' groups)" if not primary else
                   "every primary verdict is decided or not testable" if settled else
                   f"--max-seeds {args.max_seeds} reached")
            print(f"[study] the looks stop at n = {len(seeds)}: {why}", flush=True)
            earlier = [f"{e['id']} {e['status']} at n = {e['sequential_decision']['n']} ({e['status_this_look']} "
                       f"at n = {len(seeds)})" for e in primary if e.get("status_this_look")]
            if earlier:
                print(f"[study] kept from the look that decided them: {'; '.join(earlier)}", flush=True)
            return done, failed, agg
        seeds = [*seeds, max(seeds) + 1]


def print_sequential_plan(args) -> None:
    """--plan --until-decided: each look's level (alpha from config/hypotheses.yaml)."""
    alpha = load_settings()["statistics"]["alpha"]
    looks = look_alphas(len(args.seeds), args.max_seeds, alpha, args.spending)
    print(f"\n--until-decided: looks at n = {len(args.seeds)}..{args.max_seeds} seeds (at most "
          f"{args.max_seeds - len(args.seeds)} more seeds, each as many runs as one seed above); "
          f"{SPENDING_NAMES[args.spending]}, α = {alpha:g}:")
    print("  " + ", ".join(f"n = {n}: {100 * (1 - a['alpha_this_look']):.4g}%" for n, a in looks.items()))


def print_seeds_needed(args) -> None:
    """--plan, once the last evaluation has 3 or more seeds: the seeds each primary verdict needs, as its entry
    records them (`seeds_needed`: {n, reason}), else "not computed"."""
    path = Path(args.results_dir) / "comparison" / "aggregated_metrics.json"
    try:
        agg = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    seeds = {r.get("seed") for r in agg.get("runs", []) if isinstance(r, dict)}
    if len(seeds) < 3:
        return
    print(f"\nseeds needed per primary verdict ({path}, {len(seeds)} seeds evaluated):")
    for e in primary_verdicts(agg):
        need = e.get("seeds_needed")
        if isinstance(need, dict) and (need.get("n") is not None or need.get("reason")):
            text = " ".join(str(x) for x in (need.get("n"), need.get("reason") and f"({need['reason']})") if x)
        else:
            text = str(need) if isinstance(need, (int, float)) else "not computed"
        print(f"  {e.get('id', '?'):<4} {e.get('task', '?'):<12} {e.get('status', '?'):<13} {text}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.results_dir = str(Path(args.results_dir).resolve())
    runs = matrix(args)
    if args.plan:
        plan(runs, args)
        if args.until_decided:
            print_sequential_plan(args)
        print_seeds_needed(args)
        return 0
    start = time.perf_counter()
    if args.until_decided:
        runs, failed, agg = until_decided(args)
        if agg is None:
            sys.exit(f"bench/study.py: no look made: the first {len(args.seeds)} seeds' runs have not all finished"
                     + (f" ({len(failed)} failed: {' '.join(failed)})" if failed else ""))
        print_report(runs, agg, args)
    else:
        failed = [] if args.no_train else train(runs, args)
        failed += timing(runs, args) if args.timing else []
        report(runs, args)
    print(f"study wall time: {hms(time.perf_counter() - start)}")
    if failed:
        print(f"bench/study.py: {len(failed)} runs failed: {' '.join(failed)}; re-run the same command to retry "
              f"them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
