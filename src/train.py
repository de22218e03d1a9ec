"""Training layer: one readable loop for LoRA, AdaLoRA and GLoRA, with the run record written as it goes."""

from __future__ import annotations

import copy
import datetime
import csv
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from src import model as M
from src import preprocess as P

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the step."""


# ---------------------------------------------------------------------------------------------------------------
# Data parallelism over the processes `accelerate launch` or `torchrun` started.

class Dist:
    """One run on WORLD_SIZE processes (1: everything below is a no-op). Every process draws the same global batch
    and trains on its slice; gradients are summed with one all-reduce per optimizer step, before GLoRA's scores and
    AdaLoRA's allocator read them, so every process computes the same ranks. No DDP wrapper: GLoRA's rebuild
    replaces parameters mid-run, and DDP binds its buckets to the parameters it was built with. Only the main
    process writes results, logs and shows progress bars.

    `solo`: an Optuna trial inside a multi-process launch. Each launched process is then a study worker that runs
    whole trials alone on its own device (no collectives), writing its trial's folder itself."""

    def __init__(self, solo: bool = False):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        self.launched = launched > 1
        self.world = 1 if solo else launched
        self.rank = 0 if solo else int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.shows = int(os.environ.get("RANK", "0")) == 0  # progress bars: one process of the launch
        self.checks: Counter = Counter()  # what check_same compared, and how often (the summary records it)

    def init(self, device: torch.device) -> None:
        """After `setup_process` (NCCL's object collectives use the current device, which it set)."""
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def device(self, name: str, sweep_job: int | None = None) -> torch.device:
        return pick_device(name, self.local_rank if self.launched else None, sweep_job)

    def shard(self, batch: dict) -> tuple[dict, float]:
        """This process's slice of a global batch and its share of the global mean loss."""
        if self.world == 1:
            return batch, 1.0
        n = len(batch["labels"])
        part = {k: v[self.rank::self.world] for k, v in batch.items()}
        # a strided slice of a pinned batch would be copied to the GPU through pageable memory, which blocks
        part = {k: v.contiguous().pin_memory() if v.is_pinned() else v for k, v in part.items()}
        return part, len(part["labels"]) / n

    def reduce_gradients(self, model) -> None:
        """Sum the trainable gradients over processes (one flat all-reduce); a missing grad counts as zero."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        torch.distributed.all_gather_object(objs, obj)
        return objs

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, what: str, obj, step: int) -> None:
        """Every process must hold what the main one holds (e.g. the ranks): a mismatch is an error, never a
        silent divergence."""
        if self.world == 1:
            return
        objs = self.gather(obj)
        bad = [r for r, o in enumerate(objs) if o != objs[0]]
        if bad:
            raise TrainingError(f"{what} differ between processes at optimizer step {step} (process {bad[0]} vs 0)")
        self.checks[what] += 1

    def check_parameters(self, model, step: int) -> None:
        """Every process must hold the main one's trainable parameters bit for bit (after the same all-reduced
        updates they are): checked at the start, after each reallocation, at each evaluation and at the end, so a
        divergence stops the run with its step instead of corrupting it."""
        if self.world > 1:
            self.check_same("trainable parameters", trainable_digest(model), step)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def trainable_digest(model) -> str:
    """SHA-256 of the trainable parameters' names, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The run record: history.jsonl as it goes, summary.json at the end, the same rows to W&B when it is on.

def atomic_write(path: Path, write) -> None:
    """`write(tmp)` fills a temp file in the same folder, which is then renamed onto `path`: a reader never sees
    half a file, and a failed write leaves the previous file and no temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are for everyone who can read the folder
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, obj) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


class Recorder:
    """Appends each row to history.jsonl (flushed, so a killed run keeps its history) and mirrors it to W&B."""

    def __init__(self, run_dir: Path, cfg, run_name: str, enabled: bool = True, resuming: bool = False):
        self.run_dir, self.enabled = run_dir, enabled
        self.history = (run_dir / "history.jsonl").open("a", encoding="utf-8") if enabled else None
        self.wandb, self.wandb_id = None, None
        if enabled and cfg.wandb.mode != "disabled":
            import wandb

            self.wandb_id = wandb_run_id(run_dir, run_name, resuming)
            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, id=self.wandb_id, name=run_name,
                group=cfg.run_id, job_type="train", mode=cfg.wandb.mode, resume="allow" if resuming else "never",
                dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict) -> None:
        if not self.enabled:  # a data-parallel worker: the main process records
            return
        self.history.write(json.dumps(row, default=_json_default) + "\n")
        self.history.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("step", "event")}, step=row["step"])

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        if self.wandb_id:
            summary["wandb_id"] = self.wandb_id
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
        self.history.close()

    def abort(self) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
        if self.history is not None:
            self.history.close()


def wandb_run_id(run_dir: Path, run_name: str, resuming: bool) -> str:
    """The W&B run id: the run name, kept across resumes (in {run}/wandb_id); a run started over after an earlier
    attempt (moved aside to {run}.old-*) gets a fresh id, so its history is never appended to the old run's."""
    saved = run_dir / "wandb_id"
    if resuming and saved.exists():
        return saved.read_text().strip()
    earlier = any(run_dir.parent.glob(f"{glob.escape(run_dir.name)}.old-*"))
    run_id = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}" if earlier else run_name
    atomic_write(saved, lambda tmp: tmp.write_text(run_id + "\n"))
    return run_id


# ---------------------------------------------------------------------------------------------------------------
# Set-up helpers.

def open_run_dir(cfg, run_dir: Path, can_resume: bool = True) -> bool:
    """Create the run folder and write the resolved config; returns True when the run continues from a checkpoint.

    With `resume=true`, an unfinished run with a checkpoint is continued (after checking that its config is this
    one). Otherwise a folder left by an earlier run is moved aside, never deleted; its Optuna study (optuna/) comes
    back into the new folder so that a search resumes."""
    ckpt = run_dir / "checkpoint"
    if (can_resume and cfg.resume and ckpt.is_dir() and any(ckpt.glob("step-*"))
            and not (run_dir / "summary.json").exists()):
        check_same_config(cfg, run_dir / "config.yaml")
        return True
    leftovers = [p for p in run_dir.iterdir() if p.name != "optuna"] if run_dir.exists() else []
    if leftovers:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
        if (aside / "optuna").exists():
            run_dir.mkdir(parents=True)
            os.replace(aside / "optuna", run_dir / "optuna")
        log.warning("existing run folder moved aside to %s", aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    return False


RESUME_MAY_DIFFER = ("resume", "wandb.")
CONFIG_YAML = Path(__file__).resolve().parent.parent / "config" / "config.yaml"


def check_same_config(cfg, saved_path: Path) -> None:
    """Refuse to continue a checkpoint written under another config; name the keys that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved = flat(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)) if saved_path.exists() else {}
    now = flat(OmegaConf.to_container(cfg, resolve=True))
    # a setting added to config.yaml after the checkpoint was written, left at its default, changes nothing
    defaults = flat(OmegaConf.to_container(OmegaConf.load(CONFIG_YAML)))
    added = {k for k in now if k not in saved and k in defaults and now[k] == defaults[k]}
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_DIFFER) and k not in added]
    if diff:
        raise CheckpointError(f"{saved_path.parent} holds a checkpoint of a different config ({'; '.join(diff[:5])}"
                              f"{' ...' if len(diff) > 5 else ''}); pass resume=false to start over")


def truncate_history(path: Path, step: int) -> None:
    """Drop history rows after the checkpoint's step (the resumed run logs them again), and a half-written line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8"))


PRECISIONS = ("fp32", "tf32", "bf16", "auto")


def native_bf16_tf32(device: torch.device) -> bool:
    """Whether `device` has TF32 and native bfloat16 matmuls: an NVIDIA GPU of compute capability 8.0 or newer
    (Ampere on). Older GPUs (V100, T4) emulate bf16 much slower than fp16, which `torch.cuda.is_bf16_supported()`
    accepts by default, and its answer is for the current device, not necessarily the chosen one."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


def check_precision(precision: str, device: torch.device) -> str:
    """Set up hardware.precision on `device` and return the precision the run computes in. Weights, gradients and
    optimizer state are float32 in all of them; they differ in the matmuls:

    fp32: IEEE float32 (always on CPUs); tf32: float32 matmuls in TensorFloat-32 on GPUs that have it (compute
    capability >= 8.0), fp32 elsewhere, CPUs included; bf16: autocast to bfloat16 (its float32 matmuls in TF32), only
    on GPUs with native bf16, else an error; auto: bf16 where it is native, else tf32 (so fp32 on CPUs and older
    GPUs). The CUDA flags are set either way, so an earlier run in the same process leaves nothing behind; a CPU run
    touches no flag."""
    if precision not in PRECISIONS:
        raise TrainingError(f"hardware.precision={precision!r}: one of {list(PRECISIONS)}")
    native = native_bf16_tf32(device)
    rocm_bf16 = device.type == "cuda" and torch.version.hip is not None  # every ROCm GPU torch runs on has bf16
    if precision == "auto":
        precision = "bf16" if native or rocm_bf16 else "tf32"
    if precision == "bf16" and not (native or rocm_bf16):
        what = (f"{torch.cuda.get_device_name(device)}, compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else "a CPU")
        raise TrainingError(f"hardware.precision=bf16 needs a GPU with native bf16 (compute capability >= 8.0); "
                            f"device {device} is {what}: use hardware.precision=tf32 (fp32 where there is no TF32)")
    effective = precision if precision == "bf16" or native else "fp32"
    if device.type == "cuda":
        mode = "ieee" if effective == "fp32" else "tf32"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        if effective != precision:
            log.info("hardware.precision=%s: %s has no TF32; computing in fp32", precision, device)
    return effective


def quiet(progress: bool) -> dict:
    """tqdm kwargs: off in data-parallel workers; otherwise tqdm's own defaults (and TQDM_* environment)."""
    return {} if progress else {"disable": True}


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(\d+))$")


def pick_device(name: str, process: int | None = None, sweep_job: int | None = None) -> torch.device:
    """Where a run goes (hardware.device), one rule. The GPUs are those this process sees (CUDA_VISIBLE_DEVICES
    chooses them), numbered from 0:

    `cpu`; `cuda:N`: GPU N; `cuda`, or `auto` when there is a GPU: a data-parallel process takes the GPU of its
    LOCAL_RANK (`process`), Hydra sweep job k the GPU k mod the number of GPUs (`sweep_job`), any other run GPU 0;
    `auto` without a GPU: cpu. A GPU that does not exist is an error naming the ones that do."""
    match = _DEVICE.match(name)
    if match is None:
        raise TrainingError(f"hardware.device={name!r}: one of auto, cpu, cuda, cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
    if count == 0:
        if name == "auto":
            return torch.device("cpu")
        raise TrainingError(f"hardware.device={name} but this process sees no GPU ({seen}); use hardware.device=cpu "
                            f"or auto")
    if match.group(2) is not None:
        index = int(match.group(2))
        if index >= count:
            raise TrainingError(f"hardware.device={name}: this process sees {count} GPU(s), cuda:0..cuda:{count - 1} "
                                f"({seen}); in a sweep leave hardware.device=auto, job k runs on GPU k mod {count}")
        if process is not None:
            raise TrainingError(f"hardware.device={name} under a data-parallel launch would put every process on GPU "
                                f"{index}: use hardware.device=cuda (process i takes GPU LOCAL_RANK i) and choose "
                                f"the GPUs with CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", index)
    if process is not None:
        if process >= count:
            raise TrainingError(f"data-parallel process LOCAL_RANK={process} but this process sees {count} GPU(s) "
                                f"({seen}): start at most {count} processes per node")
        return torch.device("cuda", process)
    return torch.device("cuda", (sweep_job or 0) % count)


def cuda_seed(seed: int, rank: int) -> int:
    """This process's CUDA seed: the run's seed on process 0 (and in a single-process run), distinct for every
    (seed < 2**32, rank), so that no two processes of one run or of two seeds' runs share a stream."""
    return seed + rank * 2**32


def seed_process(seed: int, device: torch.device, rank: int = 0) -> None:
    """Python, NumPy and torch seeded with the run's seed, then this process's own CUDA seed. Data-parallel
    processes draw their dropout masks on their own GPUs, and one seed would give every shard of a batch the same
    masks. The CPU stream stays the same on every process: the weights are initialised from it (the task head, LoRA's
    A, GLoRA's added components), and every process must build the same ones. (Data parallel on CPUs therefore draws
    the same dropout masks on every process: a launcher test, not a way to train.)"""
    set_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(cuda_seed(seed, rank))


def setup_process(cfg, dist: Dist, sweep_job: int | None = None) -> tuple[torch.device, str]:
    """The run's device, made current before any CUDA work (so that every later CUDA call, the RNG state a
    checkpoint saves included, is this run's GPU and not GPU 0), then seeds and precision. Returns the device and
    the precision the run computes in."""
    device = dist.device(cfg.hardware.device, sweep_job)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_process(cfg.seed, device, dist.rank)
    if cfg.hardware.deterministic:
        torch.use_deterministic_algorithms(True)
    return device, check_precision(cfg.hardware.precision, device)


def check_fp32_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Every trainable parameter and every floating tensor of its optimizer state must be float32: in float16,
    AdamW's eps (1e-8) rounds to 0 and small updates vanish, so the loss turns NaN within steps whatever the learning
    rate. (Under bf16 autocast only the matmuls are bfloat16.)"""
    names = {p: n for n, p in model.named_parameters()}
    bad = [f"{n} is {p.dtype}" for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        bad += [f"optimizer state {k!r} of {names.get(p, 'a parameter')} is {v.dtype}" for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32]
    if bad:
        raise TrainingError(f"trainable parameters and their optimizer state must be float32, but {bad[0]}"
                            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: in half precision AdamW's "
                            f"eps and small updates round to 0 and the loss turns NaN, whatever the learning rate. "
                            f"The backbone must be loaded in float32 (src.model.load_backbone does so); "
                            f"lower-precision compute is hardware.precision=bf16")


def nonfinite_cause(model: torch.nn.Module, precision: str, lr: float) -> str:
    """Why the loss or the weights became non-finite, from what the model holds now (read when it has happened, so
    the host syncs cost nothing): the learning rate is named only when the trained weights themselves diverged."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    half = [(n, p) for n, p in trainable if p.dtype != torch.float32]
    if half:
        return (f"{half[0][0]} is trained in {half[0][1].dtype}, where AdamW's eps and small updates round to 0: "
                f"trainable parameters and their optimizer state must be float32")
    frozen = next((n for n, p in model.named_parameters() if not p.requires_grad and not torch.isfinite(p).all()),
                  None)
    if frozen is not None:
        return f"the frozen backbone weight {frozen} is non-finite: the backbone is broken (check model.backbone)"
    diverged = next((n for n, p in trainable if not torch.isfinite(p).all()), None)
    if diverged is not None:
        return (f"the trained weights diverged ({diverged} is non-finite) at learning rate {lr:.3g}: try a lower "
                f"training.learning_rate or training.max_grad_norm")
    largest = max(float(p.detach().abs().max()) for _, p in trainable)
    return (f"every weight is finite (largest trained |w| {largest:.3g}), so the forward pass overflowed "
            f"(hardware.precision={precision}) or an input is bad; a lower learning rate helps only if the weights "
            f"grew large")


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights."""
    if t.optimizer != "adamw":
        raise ValueError(f"training.optimizer={t.optimizer!r}: only adamw is supported")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps)


# Schedule keys take optimizer steps (an integer), epochs ("1 epoch", "0.5 epochs") or a share of the run ("20%"),
# resolved to steps once the run's length is known: a config then transfers across tasks, batch sizes and trials.
SCHEDULE_KEYS = ("training.lr_warmup_steps", "training.eval_every_steps", "training.checkpoint_every_steps",
                 "glo_ra.warmup_steps", "adalora.adaptation_start_step", "adalora.final_steps",
                 "adalora.mask_interval", "optuna.pruner.n_warmup_steps")
_SCHEDULE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|epochs?)\s*$")


def parse_schedule(key: str, value) -> tuple[Fraction, str] | None:
    """(amount, unit) with unit 'steps', 'epochs' or '%', the amount exact as written (a Fraction, so that rounding
    to steps is exact); None for null. A ConfigError-worthy ValueError names the key and the forms it takes."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{key}={value}: a schedule value cannot be negative")
        return Fraction(value), "steps"
    match = _SCHEDULE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{key}={value!r}: give optimizer steps (an integer), epochs ('1 epoch', '0.5 epochs') or a "
                         f"share of the run ('20%')")
    amount, unit = Fraction(match.group(1)), match.group(2)
    if unit == "%" and amount > 100:
        raise ValueError(f"{key}={value!r}: a share of the run lies in 0%..100%")
    return amount, ("%" if unit == "%" else "epochs")


# Intervals: a share of a short run can round to 0 steps, which would mean "never" (or divide by zero in PEFT's
# masking); a relative interval is at least one step.
INTERVAL_KEYS = ("training.eval_every_steps", "training.checkpoint_every_steps", "adalora.mask_interval")


def schedule_steps(key: str, value, total_steps: int, steps_per_epoch: int) -> int | None:
    """The schedule value in optimizer steps, rounded half up exactly (from the decimal as written, so "35%" of 90
    is 32, not float's 31); a relative interval (INTERVAL_KEYS) is at least 1."""
    parsed = parse_schedule(key, value)
    if parsed is None:
        return None
    amount, unit = parsed
    steps = {"steps": amount, "epochs": amount * steps_per_epoch, "%": amount / 100 * total_steps}[unit]
    rounded = math.floor(steps + Fraction(1, 2))
    return max(rounded, 1) if unit != "steps" and key in INTERVAL_KEYS else rounded


def scaled_steps(key: str, steps: int | None, share: Fraction) -> int | None:
    """A step count of the run at `share` of its length (an Optuna trial's budget): rounded half up; an interval
    and GLoRA's warm-up (its reallocation must still happen) stay at least 1."""
    if steps is None:
        return None
    scaled = math.floor(steps * share + Fraction(1, 2))
    return max(scaled, 1) if steps >= 1 and key in (*INTERVAL_KEYS, "glo_ra.warmup_steps") else scaled


def trial_steps(total_steps: int, share: Fraction) -> int:
    """An Optuna trial's optimizer steps at `share` of the run's (at least 1)."""
    return max(1, math.floor(total_steps * share + Fraction(1, 2)))


def trial_share(budget) -> Fraction | None:
    """optuna.trial_budget as an exact fraction (from the decimal as written); None: a trial is the whole run."""
    return None if budget is None else Fraction(str(budget))


def resolve_schedules(cfg, total_steps: int, steps_per_epoch: int, share: Fraction | None = None) -> tuple:
    """A copy of cfg with every schedule key in optimizer steps, and {key: {"given", "steps"}} for the record.
    `share` (an Optuna trial's budget): every value is resolved against the whole run, then scaled to the trial's
    length, so that the trial is the run compressed: its warm-ups, reallocation and phases at the same points."""
    resolved = copy.deepcopy(cfg)
    given = {key: OmegaConf.select(cfg, key, default=None) for key in SCHEDULE_KEYS
             if OmegaConf.select(cfg, key.split(".")[0]) is not None}  # not a method section this run lacks
    steps = {key: schedule_steps(key, value, total_steps, steps_per_epoch) for key, value in given.items()}
    if share is not None:
        steps = compress_schedule(steps, total_steps, share)
    record = {}
    for key, value in given.items():
        OmegaConf.update(resolved, key, steps[key], merge=False)
        if value is not None and (not key.startswith("optuna.") or share is not None):
            record[key] = {"given": value, "steps": steps[key]}
    return resolved, record


def compress_schedule(steps: dict[str, int | None], total: int, share: Fraction) -> dict[str, int | None]:
    """A run's schedule (in steps) at `share` of its length: every value scaled (scaled_steps), with the orderings
    the methods need kept where the run had them, which separate rounding could break: GLoRA's reallocation before
    the trial's last step, and AdaLoRA's final phase scaled by where it starts (total - final_steps) rather than by
    its length, its budgeting phase at least a step long."""
    out = {key: scaled_steps(key, value, share) for key, value in steps.items()}
    trial = trial_steps(total, share)
    warm = steps.get("glo_ra.warmup_steps")
    if warm is not None and 1 <= warm < total:
        out["glo_ra.warmup_steps"] = max(1, min(out["glo_ra.warmup_steps"], trial - 1))
    final, start = steps.get("adalora.final_steps"), steps.get("adalora.adaptation_start_step")
    if final is not None:
        boundary = scaled_steps("adalora.final_steps", total - final, share)  # where the final phase starts
        out["adalora.final_steps"] = max(0, trial - boundary)
        if start is not None and start < total - final:
            out["adalora.adaptation_start_step"] = max(0, min(out["adalora.adaptation_start_step"], boundary - 1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cost records: the run's environment, and forecasts of a full run (and its Optuna study) from measured times.

FORECAST_AFTER_STEPS = 10  # a full run logs its projected wall time once this many steps are timed


def environment(device: torch.device, world_size: int, precision: str = "fp32") -> dict:
    """What a run's times depend on: device and its name, CPU threads or GPU model, the precision it computes in
    (check_precision's: tf32 requested on a device without TF32 records fp32), library versions, host."""
    import platform
    import socket

    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "device_name": gpu or cpu, "cpu_threads": torch.get_num_threads(),
            "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu_model": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "hostname": socket.gethostname(), "world_size": world_size,
            "precision": precision}


def process_seconds() -> float:
    """Wall seconds since this Python process started (imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


@dataclass(frozen=True)
class RunShape:
    """What a run's wall time scales with."""

    train_examples: int
    eval_examples: int   # per evaluation, all eval splits together
    total_steps: int
    evaluations: int
    step_tokens: float = 0.0  # expected padded tokens per optimizer step
    eval_tokens: float = 0.0  # expected padded tokens per evaluation


def expected_batch_max(lengths: np.ndarray, batch_size: int, draws: int = 256, seed: int = 0,
                       grouped: bool = False) -> float:
    """E[longest example of a batch]: what dynamic padding pads a batch to. Random batches, or `grouped`: those of
    transformers' LengthGroupedSampler (dataset.group_by_length: mega-batches of 50 batches, each sorted by length,
    so a batch pads to about its own examples' length), drawn from the length sample with replacement."""
    rng = np.random.default_rng(seed)
    k = min(batch_size, len(lengths))
    if not grouped:
        return float(np.mean([lengths[rng.choice(len(lengths), k, replace=False)].max() for _ in range(draws)]))
    maxima = []
    for _ in range(max(1, draws // 50)):
        mega = np.sort(lengths[rng.choice(len(lengths), 50 * k, replace=True)])[::-1]
        maxima += [mega[i] for i in range(0, 50 * k, k)]  # sorted: a batch's first example is its longest
    return float(np.mean(maxima))


def sorted_split_tokens(lengths: np.ndarray, batch_size: int, n: int) -> float:
    """Padded tokens of an n-example split read longest first (preprocess.eval_order), from a sample of its token
    lengths: batch i pads to the length at quantile 1 - i * batch_size / n."""
    starts = np.arange(0, n, batch_size)
    return float(np.sum(np.minimum(batch_size, n - starts)
                        * np.quantile(lengths, 1 - starts / n, method="inverted_cdf")))


def run_shape(cfg, n_train: int, n_eval: dict[str, int], tuning: bool = False, train_lengths=None,
              eval_lengths=None) -> RunShape:
    """The shape a run of `cfg` has on a task with n_train training and n_eval[split] eval examples (before the
    config's subsampling); `tuning`: an Optuna trial (train minus the held-out tuning split, scored on it). Token
    counts come from samples of the splits' token lengths when given."""
    d, t = cfg.dataset, cfg.training
    train = min(n_train, d.max_train_samples or n_train)
    if tuning:
        holdout = math.ceil(cfg.optuna.holdout_fraction * train)  # as datasets' train_test_split
        train, n_eval = train - holdout, {"validation": holdout}
        eval_lengths = train_lengths
    evals = sum(min(n, d.max_eval_samples or n) for n in n_eval.values())
    batches = math.ceil(train / d.batch_size)
    per_epoch = math.ceil(batches_per_epoch(batches, t) / t.gradient_accumulation_steps)
    epochs = (cfg.optuna.trial_epochs or t.epochs) if tuning else t.epochs
    cap = (cfg.optuna.trial_max_steps or t.max_steps) if tuning else t.max_steps
    total = per_epoch * epochs if cap is None else min(per_epoch * epochs, cap)
    eval_every = (cfg.optuna.get("trial_eval_every") or t.eval_every_steps) if tuning else t.eval_every_steps
    every = schedule_steps("training.eval_every_steps", eval_every, total, per_epoch)
    share = trial_share(cfg.optuna.get("trial_budget")) if tuning else None
    if share is not None:
        total, every = trial_steps(total, share), scaled_steps("training.eval_every_steps", every, share)
    n = sum(1 for s in range(1, total + 1) if s % per_epoch == 0 or s == total or (every and s % every == 0))
    step_tokens = eval_tokens = 0.0
    if train_lengths is not None:
        step_tokens = min(d.batch_size, train) * t.gradient_accumulation_steps * expected_batch_max(
            train_lengths, d.batch_size, grouped=bool(d.get("group_by_length", False)))
    if eval_lengths is not None and d.get("group_by_length", False):  # each split read longest first
        eval_tokens = sum(sorted_split_tokens(eval_lengths, d.eval_batch_size, min(n, d.max_eval_samples or n))
                          for n in n_eval.values())
    elif eval_lengths is not None:
        eval_tokens = evals * expected_batch_max(eval_lengths, d.eval_batch_size)
    return RunShape(train, evals, total, n, step_tokens, eval_tokens)


def forecast_seconds(shape: RunShape, rates: dict, per_run_setup: float) -> float:
    """Projected wall time: set-up, tokenising the run's examples, steps and evaluations (per padded token)."""
    return (per_run_setup + rates["tokenize_s_per_example"] * (shape.train_examples + shape.eval_examples)
            + shape.total_steps * shape.step_tokens * rates["step_s_per_token"]
            + shape.evaluations * shape.eval_tokens * rates["eval_s_per_token"])


def full_run_forecast(cfg, rates: dict, n_train: int, n_eval: dict[str, int], train_lengths, eval_lengths) -> dict:
    """A trial run's forecast of the full run (the values `mode=trial` replaced put back) and of its Optuna study
    (trials x per-trial budget, pruning aside), on this device, from the trial's own measured rates."""
    full = copy.deepcopy(cfg)
    for key, value in (cfg.get("trial_replaced") or {}).items():
        OmegaConf.update(full, key, value, merge=False)
    run = run_shape(full, n_train, n_eval, False, train_lengths, eval_lengths)
    out = {"forecast_full_run_s": forecast_seconds(run, rates, rates["imports_s"] + rates["setup_s"]),
           "forecast_full_run_shape": asdict(run), "forecast_basis": rates}
    if full.optuna.n_trials:
        trial = run_shape(full, n_train, n_eval, True, train_lengths, eval_lengths)
        per_trial = forecast_seconds(trial, rates, rates["setup_s"])
        out.update(forecast_study_s=full.optuna.n_trials * per_trial, forecast_trial_s=per_trial,
                   forecast_trial_shape=asdict(trial), forecast_n_trials=int(full.optuna.n_trials))
    return out


def describe_forecast(f: dict, env: dict) -> str:
    def hms(sec: float) -> str:
        return f"{sec / 3600:.1f} h" if sec >= 5400 else f"{sec / 60:.1f} min"

    shape, rates = f["forecast_full_run_shape"], f["forecast_basis"]
    step = shape["step_tokens"] * rates["step_s_per_token"]
    line = (f"forecast on this device ({env['device_name']}, {env['cpu_threads']} CPU threads): a step of "
            f"{shape['step_tokens']:.0f} padded tokens takes about {step:.3f} s -> the full run ({shape['total_steps']} "
            f"steps, {shape['evaluations']} evaluations of {shape['eval_examples']} examples) takes about "
            f"{hms(f['forecast_full_run_s'])}")
    if "forecast_study_s" in f:
        line += (f"; its Optuna study {f['forecast_n_trials']} trials x {hms(f['forecast_trial_s'])} = "
                 f"{hms(f['forecast_study_s'])} (pruning aside), so study + final run about "
                 f"{hms(f['forecast_study_s'] + f['forecast_full_run_s'])}")
    return line


def batches_per_epoch(n_batches: int, t) -> int:
    return n_batches if t.max_train_batches is None else min(n_batches, t.max_train_batches)


@torch.no_grad()
def evaluate_split(model, loader, spec: P.TaskSpec, device, autocast, dist: Dist | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and mean task loss on one eval split. The loss is computed here from the logits, not
    taken from the model: PEFT's AdaLoRA adds its orthogonal regulariser to any loss it returns, which would make
    validation losses incomparable across methods. Everything stays on the device until the end (one host sync per
    split); the loss sums in float64, batch by batch in order, the same additions as Python floats would make.
    Data parallel: process r evaluates batches r, r + W, ... (the same batches as one process would, so the same
    padding), and every process gets all of them back in order. A loader that reads the split in another order
    (dataset.group_by_length: longest first) has its predictions and labels put back in the split's order."""
    dist = dist or Dist(solo=True)
    model.eval()
    batches = []  # (batch number, predictions, labels, summed loss), on the device
    for b, batch in enumerate(tqdm(loader, desc="eval", leave=False, mininterval=2, **quiet(dist.shows))):
        if b % dist.world != dist.rank:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "idx"}
        y = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if spec.is_regression:
            pred = logits.squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred, y.float(), reduction="sum")
        else:
            pred = logits.argmax(-1)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        batches.append((b, pred, y, loss.double()))
    model.train()
    if batches:
        losses = torch.stack([x[3] for x in batches]).cpu().tolist()
        mine = [(b, pred.cpu().numpy(), y.cpu().numpy(), loss)
                for (b, pred, y, _), loss in zip(batches, losses)]
    else:
        mine = []
    every = sorted((x for part in dist.gather(mine) for x in part), key=lambda x: x[0])
    if not every:
        return np.array([]), np.array([]), 0.0
    loss_sum = 0.0
    for x in every:
        loss_sum += x[3]
    n = sum(len(x[2]) for x in every)
    preds, labels = np.concatenate([x[1] for x in every]), np.concatenate([x[2] for x in every])
    if isinstance(getattr(loader, "sampler", None), P.EvalOrder):  # read in that order: back to the split's
        order = np.asarray(loader.sampler)
        preds[order], labels[order] = preds.copy(), labels.copy()
    return preds, labels, loss_sum / max(n, 1)


def run_evaluation(model, eval_loaders, spec, device, autocast, dist: Dist | None = None) -> tuple[dict, dict]:
    """`validation_*` metrics of every eval split (MNLI's mismatched split gets the `_mm` suffix) and predictions."""
    metrics, predictions = {}, {}
    for split, loader in eval_loaders.items():
        preds, labels, loss = evaluate_split(model, loader, spec, device, autocast, dist)
        suffix = "_mm" if split == "validation_mm" else ""
        for k, v in {**P.compute_metrics(spec, preds, labels), "loss": loss}.items():
            metrics[f"validation_{k}{suffix}"] = v
        predictions[split] = (loader.dataset["idx"], labels, preds)
    plain = {k.removeprefix("validation_"): v for k, v in metrics.items()}
    if spec.glue_metric != "accuracy_m_mm_mean" or "accuracy_mm" in plain:
        metrics["validation_glue_score"] = P.glue_score(spec, plain)
    return metrics, predictions


def save_predictions(path: Path, predictions: dict) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "idx", "label", "prediction"])
            for split, (idx, labels, preds) in predictions.items():
                for i, y, p in zip(np.asarray(idx).tolist(), labels.tolist(), preds.tolist()):
                    w.writerow([split, i, y, p])

    atomic_write(path, write)


def write_init(path: Path, tensors: dict, info: dict) -> None:
    """A method's data-pass result (EVA's A initialisation, which also fixes its ranks) with its summary values, so
    that a resumed run rebuilds the same adapter without a second pass."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"info": json.dumps(info)}))


def read_init(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    return load_file(path), info


def save_adapter(model, path: Path) -> None:
    """PEFT save_pretrained (safetensors), written beside and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run, in four phases: set-up, resume, the loop (`_loop`), finish.

def train_run(cfg, run_dir: Path, run_name: str, on_eval=None, extra_summary: dict | None = None,
              sweep_job: int | None = None) -> dict:
    """Train one run of `cfg` into `run_dir` and return its summary (also written to summary.json).

    `on_eval(metrics, step, prunable)` makes this an Optuna trial: it trains on the training set minus a
    held-out tuning split, evaluates on that split (never on the dev set that the final run reports), and saves no
    adapter or predictions. The callback may raise to prune. `sweep_job`: the run's job number in a Hydra sweep
    (its GPU, see pick_device).
    """
    imports_s, tic = process_seconds(), time.perf_counter()
    run = set_up_run(cfg, run_dir, run_name, tuning=on_eval is not None, sweep_job=sweep_job)
    state = resume_run(run) if run.resuming else None
    # opened after resume_run: it appends to the history cut back to the checkpoint's step
    recorder = Recorder(run_dir, run.given, run_name, enabled=run.dist.main, resuming=run.resuming)
    env = environment(run.device, run.dist.world, run.precision)
    setup_s = time.perf_counter() - tic - run.tokenize_s

    forecast = None
    if run.dist.main and not run.tuning and run.cfg.get("mode") != "trial":
        forecast = partial(run_time_forecast, run, env)
    init_seconds = (run.init_info.get("eva_init_s", 0.0), run.init_info.get("eva_init_cpu_s", 0.0))
    try:
        summary = _loop(run, recorder, on_eval, state, forecast, init_seconds)
        final_ranks = M.current_ranks(run.model)
        run.dist.check_same("final ranks", final_ranks, summary["final_step"])
    except BaseException:
        recorder.abort()
        run.dist.close()
        raise

    summary.update(run_record(run, final_ranks, env, extra_summary))
    if run.cfg.get("mode") == "trial" and run.dist.main and summary["step_time_s"]:
        summary.update(trial_forecast(run, summary, imports_s, setup_s))
        log.info(describe_forecast(summary, env))
    finish_run(run, recorder, summary)
    return summary


@dataclass
class RunSetup:
    """What the set-up built, for the phases after it (resume, the loop, finish)."""

    cfg: DictConfig                 # every schedule key in optimizer steps
    given: DictConfig               # as given: what config.yaml records and a resume compares
    run_dir: Path
    run_name: str
    tuning: bool                    # an Optuna trial: no checkpoints, adapter or predictions
    resuming: bool                  # continues from a checkpoint in run_dir
    dist: Dist
    device: torch.device
    precision: str                  # what the run computes in (check_precision's)
    autocast: Callable              # bf16 autocast, or a no-op context
    task: str
    spec: P.TaskSpec
    data: dict                      # the tokenised splits the run trains and evaluates on
    available: dict[str, int]       # examples per split before subsampling: what a full run would see
    pools: dict                     # untokenised and whole: a trial's forecast samples their lengths
    tokenizer: object
    stored_dtype: str | None        # the backbone's on disk (it is loaded in float32)
    tokenize_s: float
    tokenized: str                  # the tokenised splits were 'read' from the cache, 'written' to it or 'tokenized'
    train_loader: torch.utils.data.DataLoader
    eval_loaders: dict
    n_batches: int                  # micro-batches per epoch
    per_epoch: int                  # optimizer steps per epoch
    total_steps: int
    schedule: dict                  # {key: {"given", "steps"}} of the schedule keys set
    model: torch.nn.Module
    forward: Callable               # the training forward: the model, or hardware.compile's compiled model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hook: M.AdapterHook
    checkpoints: Checkpoints | None  # None in a trial
    init_info: dict                 # EVA's data pass: its summary values
    initial_ranks: dict[str, int]


def set_up_run(cfg, run_dir: Path, run_name: str, tuning: bool, sweep_job: int | None = None) -> RunSetup:
    """Process, data, backbone, loaders, step counts, run folder, adapter, optimizer, scheduler and hook. The order
    is part of the run: the task head, LoRA's A and GLoRA's added components are drawn from the CPU RNG in it."""
    d = cfg.dataset
    dist = Dist(solo=tuning)  # a trial runs alone on its process's device, also inside a multi-process launch
    device, precision = setup_process(cfg, dist, sweep_job)
    dist.init(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    # data first: a bad file fails before the model is loaded
    task, spec = P.task_spec(d.name)
    data, available, pools = load_splits(cfg, task, tuning)
    tokenizer, base = M.load_backbone(cfg.model.backbone, spec.num_labels, cfg.model.cache_dir)
    stored = backbone_stored_dtype(cfg, precision)
    tokenize_tic = time.perf_counter()
    # tokenised once per (splits, tokenizer, max_length) and cached: a data-parallel launch's main process writes
    # it while the others wait, then they read it
    cache = d.cache_dir if d.get("tokenized_cache", True) else None
    if dist.main:
        data, tokenized = P.tokenize_cached(data, tokenizer, d.max_length, cache)
    dist.barrier()
    if not dist.main:
        data, tokenized = P.tokenize_cached(data, tokenizer, d.max_length, cache, write=False)
    tokenize_s = time.perf_counter() - tokenize_tic
    # a data-parallel process has communication threads running: its loader processes start from a fork server
    # (a fork copies a thread's held lock into a child that then waits on it forever: one such hang seen on gloo)
    train_loader, eval_loaders = P.make_loaders(data, tokenizer, d.batch_size, d.eval_batch_size, cfg.seed,
                                                d.num_workers, pin_memory=device.type == "cuda",
                                                group_by_length=d.group_by_length,
                                                start_method="forkserver" if dist.world > 1 else "fork")

    # the run's length, which relative schedule values ("20%", "1 epoch") resolve against
    t = cfg.training
    n_batches = batches_per_epoch(len(train_loader), t)
    per_epoch = math.ceil(n_batches / t.gradient_accumulation_steps)
    total_steps = per_epoch * t.epochs if t.max_steps is None else min(per_epoch * t.epochs, t.max_steps)
    given = cfg  # what config.yaml records and a resume compares; `cfg` from here on has every schedule in steps
    share = trial_share(cfg.optuna.get("trial_budget")) if tuning else None
    cfg, schedule = resolve_schedules(given, total_steps, per_epoch, share)
    if share is not None:  # the trial's budget: the run compressed to this share of its optimizer steps
        total_steps = trial_steps(total_steps, share)
    if dist.world > 1 and cfg.optuna.get("best_params") is not None:  # each process read the study on its own
        dist.check_same("Optuna's best values", OmegaConf.to_container(cfg.optuna.best_params), 0)
    t = cfg.training
    check_budget_resolved(cfg, base, total_steps, schedule)
    # only now: bad input leaves results untouched; the main process owns the folder
    resuming = dist.broadcast(open_run_dir(given, run_dir, can_resume=not tuning) if dist.main else None)
    dist.barrier()

    model = build_model(cfg, base, total_steps, device)
    forward = compiled(model) if cfg.hardware.get("compile") else model
    # EVA's data pass (timed as training) or, on resume, its saved result: before the optimizer sees the parameters
    init_file = run_dir / "eva_init.safetensors"
    saved_init, init_info = (read_init(init_file) if resuming and init_file.exists() else (None, {}))
    init_tensors, fresh_info = {}, {}
    if dist.main or saved_init is not None:
        init_tensors, fresh_info = M.prepare_adapter(
            cfg, model, lambda size: P.make_loaders(data, tokenizer, size, d.eval_batch_size, cfg.seed)[0], device,
            saved_init, dist.shows)
    if dist.world > 1 and saved_init is None:
        # a data pass (EVA's) runs once, on the main process; the others take its result and the CPU RNG state
        # after it (the stream later weights are drawn from), instead of a pass of their own that might differ
        shared = dist.broadcast(({k: v.cpu() for k, v in init_tensors.items()}, fresh_info, torch.get_rng_state())
                                if dist.main else None)
        if not dist.main:
            init_tensors, fresh_info = (M.prepare_adapter(cfg, model, None, device, shared[0], False)[0]
                                        if shared[0] else {}), shared[1]
            torch.set_rng_state(shared[2])
    init_info = init_info or fresh_info
    if init_tensors and saved_init is None and dist.main and not tuning:
        write_init(init_file, init_tensors, init_info)
    optimizer = build_optimizer(model, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                              num_training_steps=total_steps)
    hook = M.make_hook(cfg, model, optimizer)
    check_fp32_state(model, optimizer)
    checkpoints = None if tuning else Checkpoints(run_dir / "checkpoint", model, optimizer, scheduler, hook,
                                                   t.keep_checkpoints, dist, device, precision)
    run = RunSetup(
        cfg=cfg, given=given, run_dir=run_dir, run_name=run_name, tuning=tuning, resuming=bool(resuming), dist=dist,
        device=device, precision=precision, autocast=autocast, task=task, spec=spec, data=data, available=available,
        pools=pools, tokenizer=tokenizer, stored_dtype=stored, tokenize_s=tokenize_s, tokenized=tokenized,
        train_loader=train_loader,
        eval_loaders=eval_loaders, n_batches=n_batches, per_epoch=per_epoch, total_steps=total_steps,
        schedule=schedule, model=model, forward=forward, optimizer=optimizer, scheduler=scheduler, hook=hook, checkpoints=checkpoints,
        init_info=init_info, initial_ranks=M.current_ranks(model))
    log_start(run)
    return run


def load_splits(cfg, task: str, tuning: bool) -> tuple[dict, dict[str, int], dict]:
    """The splits the run uses (subsampled; a trial's: the training set minus a held-out tuning split, and that
    split), the size of every split before subsampling, and the whole splits."""
    d = cfg.dataset
    data = P.load_glue(task, d.data_dir, d.cache_dir)
    available = {split: len(ds) for split, ds in data.items()}  # before subsampling: what a full run would see
    pools = dict(data)  # untokenised and whole: a trial's forecast samples their lengths
    data["train"] = P.subsample(data["train"], d.max_train_samples)
    if tuning:
        data = P.tuning_split(data["train"], cfg.optuna.holdout_fraction)
    for split in [s for s in data if s != "train"]:
        data[split] = P.subsample(data[split], d.max_eval_samples)
    return data, available, pools


def backbone_stored_dtype(cfg, precision: str) -> str | None:
    """The dtype the backbone is stored in (None: its files do not say), logged when it is not float32, the dtype
    it is loaded in."""
    stored = M.stored_dtype(cfg.model.backbone, cfg.model.cache_dir)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    if stored not in (None, "float32"):
        log.info("model.backbone=%s is stored in %s; loaded in float32 (hardware.precision=%s computes in %s)",
                 cfg.model.backbone, stored, cfg.hardware.precision, precision)
    return stored


def check_budget_resolved(cfg, base, total_steps: int, schedule: dict) -> None:
    """M.check_budget on the config with its schedules in steps; an error names the relative values it was given
    and the steps they resolved to, since those are what failed."""
    try:
        M.check_budget(cfg, base, total_steps)
    except M.ModelError as e:
        relative = [f"{k}={v['given']!r} -> {v['steps']} steps" for k, v in schedule.items()
                    if not isinstance(v["given"], int)]
        raise M.ModelError(f"{e}{' (resolved: ' + '; '.join(relative) + ')' if relative else ''}") from None


def compiled(model: torch.nn.Module):
    """hardware.compile: torch.compile of the training forward (and so its backward), with dynamic shapes (batches
    are padded to their longest example). GLoRA's rebuild swaps the adapter's modules, which recompiles once;
    evaluation runs eager. The model itself is what checkpoints, the hooks and the optimizer see."""
    return torch.compile(model, dynamic=True)


def compile_record() -> dict:
    """What torch.compile did in this process (dynamo's counters): graphs compiled (GLoRA's rebuild adds the
    recompiled ones) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def build_model(cfg, base, total_steps: int, device: torch.device) -> torch.nn.Module:
    """The backbone with the method's adapter, on `device`, in train mode (with gradient checkpointing if set)."""
    if cfg.training.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    model = M.build_adapter(cfg, base, total_steps).to(device)
    if cfg.training.gradient_checkpointing:
        model.enable_input_require_grads()
    model.train()
    return model


def log_start(run: RunSetup) -> None:
    """The start summary (examples, optimizer steps, batch, trainable parameters, rank budget), then the schedule
    values given relative to the run, in steps."""
    cfg, t = run.cfg, run.cfg.training
    log.info("%s | %s on %s | %d train examples, %d optimizer steps (%d/epoch), batch %d x accum %d | "
             "trainable params %d, rank budget %d | device %s", run.run_name, cfg.method_name, run.task,
             len(run.data["train"]), run.total_steps, run.per_epoch, cfg.dataset.batch_size,
             t.gradient_accumulation_steps, M.parameter_counts(run.model)["trainable_params"],
             sum(run.initial_ranks.values()), run.device)
    relative = {k: v for k, v in run.schedule.items() if not isinstance(v["given"], int)}
    if relative:
        log.info("schedule in optimizer steps: %s", ", ".join(f"{k}={v['given']!r} -> {v['steps']}"
                                                            for k, v in relative.items()))


def resume_run(run: RunSetup) -> LoopState:
    """The newest readable checkpoint, restored into the set-up (weights, optimizer, scheduler, hook, RNG states);
    the history is cut back to its step, since the resumed run logs the later rows again."""
    state = run.checkpoints.restore_latest()
    check_fp32_state(run.model, run.optimizer)
    run.dist.check_same("resumed checkpoint steps", state.step, state.step)
    if run.dist.main:
        truncate_history(run.run_dir / "history.jsonl", state.step)
    return state


def run_time_forecast(run: RunSetup, env: dict, step_s: float, step: int) -> str:
    """A full run's projected wall time, once its first steps are timed (evaluation: a forward pass at about a
    third of a training step's cost per example, until one is measured)."""
    cfg, available = run.cfg, run.available
    shape = run_shape(cfg, available["train"], {k: v for k, v in available.items() if k != "train"})
    eval_examples = sum(len(ds) for split, ds in run.data.items() if split != "train")
    remaining = ((run.total_steps - step) * step_s
                 + shape.evaluations * eval_examples * step_s / cfg.dataset.batch_size / 3)
    return (f"step time {step_s:.3f} s (median of the first {FORECAST_AFTER_STEPS} timed steps) on "
            f"{env['device_name']}: training about {run.total_steps * step_s / 60:.1f} min, the whole run about "
            f"{(process_seconds() + remaining) / 60:.1f} min")


def run_record(run: RunSetup, final_ranks: dict[str, int], env: dict, extra_summary: dict | None) -> dict:
    """The summary's account of the run, after the loop's metrics: what ran, its steps and schedule, parameter
    counts and ranks, the hook's and EVA's values, the environment."""
    cfg = run.cfg
    return dict(
        run_id=cfg.run_id, run_name=run.run_name, method=cfg.method, method_name=cfg.method_name, task=run.task,
        dataset=cfg.dataset.name, backbone=str(cfg.model.backbone), seed=cfg.seed, status="finished",
        total_steps=run.total_steps, steps_per_epoch=run.per_epoch, schedule_steps=run.schedule,
        epochs=cfg.training.epochs, **M.parameter_counts(run.model), rank_budget_total=sum(final_ranks.values()),
        rank_budget_initial=sum(run.initial_ranks.values()), final_ranks=final_ranks, variant=cfg.get("variant"),
        **run.hook.summary(), **run.init_info, environment=env, backbone_stored_dtype=run.stored_dtype,
        tokenized={"source": run.tokenized, "seconds": run.tokenize_s},
        **(extra_summary or {}))


def trial_forecast(run: RunSetup, summary: dict, imports_s: float, setup_s: float) -> dict:
    """A trial run's forecast of the full run and its Optuna study, from the rates it measured."""
    d = run.cfg.dataset
    train_lengths, tokenize_per_example = P.sample_lengths(run.pools["train"], run.tokenizer, d.max_length)
    eval_split = next(k for k in run.pools if k != "train")
    eval_lengths, _ = P.sample_lengths(run.pools[eval_split], run.tokenizer, d.max_length)
    def padded(lengths: list[int]) -> float:  # in the order the eval loader reads them, as run_shape counts them
        return (sorted_split_tokens(np.array(lengths), d.eval_batch_size, len(lengths))
                if d.get("group_by_length", False) else P.padded_tokens(lengths, d.eval_batch_size))

    trial_eval_tokens = sum(padded([len(x) for x in ds["input_ids"]]) for split, ds in run.data.items()
                            if split != "train")
    # per token of the global batch (data parallel: each process trains on its share at the same time)
    rates = {"step_s_per_token": summary["step_time_s"]["median"] / (summary["step_time_s"]["tokens_median"]
                                                                      * run.dist.world),
             "eval_s_per_token": summary["eval_time_s"] / max(1, summary["evaluations"] * trial_eval_tokens),
             "tokenize_s_per_example": tokenize_per_example, "imports_s": imports_s, "setup_s": setup_s}
    return full_run_forecast(run.given, rates, run.available["train"],
                             {k: v for k, v in run.available.items() if k != "train"}, train_lengths, eval_lengths)


def finish_run(run: RunSetup, recorder: Recorder, summary: dict) -> None:
    """The run's files (GLoRA's rank allocation, the adapter unless a trial, summary.json last), then the processes
    released."""
    dist = run.dist
    if dist.world > 1:
        summary["processes"] = dist.world
        # what was compared across the processes and found identical, and how often
        summary["cross_process_checks"] = dict(sorted(dist.checks.items()))
    if run.forward is not run.model:
        summary["compile"] = compile_record()
    if dist.main and run.hook.summary().get("realloc_step") is not None:
        write_json_atomic(run.run_dir / "rank_allocation.json", run.hook.event)
    if dist.main and not run.tuning:
        save_adapter(run.model, run.run_dir / "adapter")
    recorder.finish(summary)
    dist.barrier()
    dist.close()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: resume after a kill, also after GLoRA's reallocation.

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, or from another config)."""


class Checkpoints:
    """{run_dir}/checkpoint/step-NNNNNNN/: trainable weights (safetensors), optimizer and scheduler state dicts
    (torch.save, read back with weights_only=True), the hook's state (AdaLoRA's allocator, GLoRA's scores and
    allocation: `hook.state_dict()`), every process's RNG states (CPU, and its GPU's) and the
    loop state (data position, elapsed train time). Each is written to a temp folder and renamed, so a kill mid-write
    leaves the previous checkpoint whole; the last `keep` are kept."""

    def __init__(self, root: Path, model, optimizer, scheduler, hook, keep: int, dist: Dist | None = None,
                 device: torch.device = torch.device("cpu"), precision: str = "fp32"):
        self.root, self.model, self.optimizer, self.scheduler = root, model, optimizer, scheduler
        self.hook, self.keep = hook, max(1, keep)
        self.dist, self.device, self.precision = dist or Dist(), device, precision
        self.writer = self.dist.main  # data parallel: only the main process writes (every process reads)

    def save(self, st: LoopState) -> Path:
        final = self.root / f"step-{st.step:07d}"
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                   if p.requires_grad}
        bad = [n for n, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:  # never replace a good checkpoint with a broken one
            raise TrainingError(f"weights became non-finite at optimizer step {st.step} ({bad[0].removeprefix('param/')}"
                                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); stopping, the last good "
                                f"checkpoint is kept. Cause: "
                                f"{nonfinite_cause(self.model, self.precision, self.scheduler.get_last_lr()[0])}")
        rng = self.dist.gather(rng_states(self.device))  # a collective: every process, before the writer returns
        if not self.writer:
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        from safetensors.torch import save_file

        for rank, states in enumerate(rng):
            tensors.update({f"{rng_prefix(rank)}{kind}": v for kind, v in states.items()})
        hook_tensors, hook_meta = self.hook.state_dict()
        tensors.update({f"hook/{k}": v.detach().cpu().contiguous() for k, v in hook_tensors.items()})
        save_file(tensors, tmp / "state.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", {"loop": asdict(st), "hook": hook_meta})
        if final.exists():  # a stale checkpoint of this step (the run resumed from before it): replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def available(self) -> list[Path]:
        return sorted(self.root.glob("step-*"), reverse=True) if self.root.exists() else []

    def restore_latest(self) -> LoopState:
        """Load the newest readable checkpoint; an unreadable one is reported and the previous one used."""
        problems = []
        for path in self.available():
            try:
                parts = self._read(path)
            except Exception as e:  # corrupt or truncated files: fall back to the previous checkpoint
                problems.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                aside = path.with_name(f"corrupt-{path.name}")  # kept for inspection; out of the step-* rotation
                if self.writer:
                    shutil.rmtree(aside, ignore_errors=True)
                    path.rename(aside)
                log.warning("checkpoint %s is unreadable (%s); moved to %s, trying the previous one", path,
                            problems[-1], aside.name)
                continue
            st = self._apply(*parts)
            log.info("resuming from %s (optimizer step %d, epoch %d)", path, st.step, st.epoch)
            return st
        raise CheckpointError(f"no readable checkpoint in {self.root}: {'; '.join(problems) or 'none found'}")

    @staticmethod
    def _read(path: Path):
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return state, tensors, opt

    def _apply(self, state: dict, tensors: dict, opt: dict) -> LoopState:
        # first: a GLoRA checkpoint taken after the reallocation rebuilds the ranks the weights need
        self.hook.load_state_dict({k.removeprefix("hook/"): v for k, v in tensors.items() if k.startswith("hook/")},
                                  state["hook"])
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        saved = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
        if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
            raise CheckpointError("checkpoint weights do not match this model (different config or code)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n].to(p.device))
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        prefix = rng_prefix(self.dist.rank)
        mine = {k.removeprefix(prefix): v for k, v in tensors.items()
                if k.startswith(prefix) and "/" not in k.removeprefix(prefix)}
        if "torch" not in mine or (self.device.type == "cuda" and "cuda" not in mine):
            log.warning("the checkpoint holds no %s RNG state for process %d (written by another number of processes "
                        "or on another device): training continues, but not exactly as it would have",
                        "CPU" if "torch" not in mine else "GPU", self.dist.rank)
        set_rng_states(mine, self.device)
        st = LoopState(**state["loop"])
        st.resumes += 1
        return st


def rng_prefix(rank: int) -> str:
    """Checkpoint keys of a process's RNG states: rng/torch, rng/cuda for process 0 (as single-process runs have
    always written them), rng/process{r}/... for the others."""
    return "rng/" if rank == 0 else f"rng/process{rank}/"


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: CPU, and on a GPU that GPU's (never GPU 0's by default)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch (epoch 0: the run's seed, as make_loaders seeds it)."""
    return seed + 1_000_003 * epoch


def forward_backward(model, batch: dict, device, autocast, accum: int = 1, share: float = 1.0) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss (detached, on the device: no host sync).
    The backward pass sees loss * share / accum, so accumulated (and, data parallel, summed) gradients are those of
    the global mean loss; `share` is this process's part of the global batch."""
    if not len(batch["labels"]):  # data parallel: a last global batch smaller than the number of processes
        return torch.zeros((), device=device)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "idx"}  # pinned on a GPU
    with autocast():
        loss = model(**batch).loss  # AdaLoRA adds its orthogonal regulariser here (labels are passed)
    (loss * share / accum).backward()
    return loss.detach().float() * share


def optimizer_step(model, optimizer, scheduler, hook, step: int, max_grad_norm: float, dist=None) -> dict | None:
    """One optimizer step in the order the adapters need: (data parallel: sum the gradients), GLoRA's score hook on
    the unclipped gradients, clip, step, schedule, then the adapter hook (AdaLoRA's update_and_allocate, GLoRA's
    reallocation read p.grad), zero_grad."""
    if dist is not None:
        dist.reduce_gradients(model)
    hook.on_gradients(step)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    event = hook.on_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)
    return event


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where a checkpoint left it."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0          # micro-batches consumed in the current epoch
    train_time: float = 0.0
    eval_time: float = 0.0
    running_loss: float = 0.0
    running_n: int = 0
    best_value: float | None = None  # of the primary dev metric; None before the first evaluation
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    resumes: int = 0
    cpu_time: float = 0.0          # process CPU time over the same intervals as train_time
    step_times: list = field(default_factory=list)  # wall seconds of every optimizer step (a rebuild pause apart)
    step_tokens: list = field(default_factory=list)  # padded tokens each step trained on (this process)
    evaluations: int = 0
    rebuild_pause: float | None = None
    timed_from: str | None = None  # UTC time training first started (a resume keeps it): which runs were timed together


class StepClock:
    """Training time as wall and process CPU time over the training intervals (evaluation and checkpoints outside
    them), and the time of every optimizer step, a one-off rebuild pause apart.

    On a CPU each step boundary reads perf_counter. On a GPU it is a CUDA event recorded on the stream, so timing adds
    no host sync: a step's time is the GPU's from one boundary to the next, and the events are read at `flush()`,
    where the loop waits for the GPU anyway (a logged step; `stop()` before evaluation, a checkpoint, the end)."""

    def __init__(self, st: LoopState, device: torch.device):
        self.st, self.device, self.cuda = st, device, device.type == "cuda"
        self.tokens = 0  # of the step in progress
        self.pending: list = []  # GPU: (start event, end event, tokens, pause) of steps not read yet

    def count(self, batch: dict) -> None:
        self.tokens += batch["input_ids"].numel()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.wall0 = time.perf_counter()
        self.mark = self.wall0 if not self.cuda else self._mark()
        self.cpu0 = time.process_time()

    def step(self, pause: float = 0.0) -> None:
        now = self._mark()
        if self.cuda:
            self.pending.append((self.mark, now, self.tokens, pause))
        else:
            self._record(now - self.mark, self.tokens, pause)
        self.tokens = 0
        self.mark = now

    def _record(self, seconds: float, tokens: int, pause: float) -> None:
        self.st.step_times.append(seconds - pause)
        self.st.step_tokens.append(tokens)
        if pause:
            self.st.rebuild_pause = pause

    def flush(self) -> float | None:
        """The latest step's seconds, once every timed step is recorded (GPU: waits for the last step's event)."""
        if self.pending:
            self.pending[-1][1].synchronize()
            for begin, end, tokens, pause in self.pending:
                self._record(begin.elapsed_time(end) / 1000, tokens, pause)
            self.pending = []
        return self.st.step_times[-1] if self.st.step_times else None

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.flush()
        self.st.train_time += time.perf_counter() - self.wall0
        self.st.cpu_time += time.process_time() - self.cpu0


def step_time_stats(times: list[float], tokens: list[int] | None = None) -> dict | None:
    """Median and spread of the per-step wall times (the first step, which pays one-off set-up costs, left out).

    With dynamic padding a step's time follows its batch's padded length, so the raw spread says little about
    outside load. `unexplained_iqr` is the spread that the padded token count does not explain: the IQR of the
    residuals of a least-squares line time ~ tokens, relative to the median time. A method whose steps cost more in
    one phase (GLoRA's delta_grad warm-up, AdaLoRA's budgeting) widens it on an idle machine too, so the load signal
    is `unexplained_jitter`: the IQR of the step-to-step differences of those residuals (/√2, so that it matches the
    IQR for independent noise), relative to the median time. A level shift between phases moves one difference;
    another process competing for the device moves them all."""
    skip = 1 if len(times) >= 2 else 0
    times = np.asarray(times[skip:], dtype=float)
    if not len(times):
        return None
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    out = {"median": float(med), "iqr": float(q3 - q1), "p25": float(q1), "p75": float(q3), "n": len(times)}
    if tokens is not None and len(tokens) == len(times) + skip:
        x = np.asarray(tokens[skip:], dtype=float)
        out["tokens_median"] = float(np.median(x))
        if len(times) >= 8 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, times, 1)
            residuals = times - (slope * x + intercept)
            r1, r3 = np.percentile(residuals, [25, 75])
            d1, d3 = np.percentile(np.diff(residuals), [25, 75])
            out.update(seconds_per_1k_tokens=float(1000 * slope), unexplained_iqr=float((r3 - r1) / med),
                       unexplained_jitter=float((d3 - d1) / math.sqrt(2) / med))
    return out


def _loop(run: RunSetup, recorder: Recorder, on_eval=None, state: LoopState | None = None, forecast=None,
          init_seconds: tuple[float, float] = (0.0, 0.0)) -> dict:
    """The training loop over what `run`'s set-up built; returns the metric part of the summary.
    `forecast(step_seconds, step)`: the line logged once the first FORECAST_AFTER_STEPS steps have been timed. On a
    GPU the host waits for it only at logged steps (training.log_every_steps), evaluations and checkpoints.
    `init_seconds`: (wall, CPU) seconds of a data pass before training (EVA's), counted as training time in a new
    run (a resumed run's state already holds them)."""
    cfg, model, optimizer, scheduler, hook = run.cfg, run.model, run.optimizer, run.scheduler, run.hook
    train_loader, eval_loaders, checkpoints = run.train_loader, run.eval_loaders, run.checkpoints
    spec, device, autocast, precision, dist = run.spec, run.device, run.autocast, run.precision, run.dist
    n_batches, total_steps = run.n_batches, run.total_steps
    t = cfg.training
    accum = t.gradient_accumulation_steps
    per_epoch = math.ceil(n_batches / accum)
    primary = f"validation_{P.primary_metric(spec)}"
    st = state or LoopState(train_time=init_seconds[0], cpu_time=init_seconds[1])
    last_predictions = {}
    running_loss = torch.tensor(st.running_loss if dist.main else 0.0, device=device)
    pbar = tqdm(total=total_steps, initial=st.step, desc="train", mininterval=1, **quiet(dist.shows))
    dist.check_parameters(model, st.step)

    clock = StepClock(st, device)
    forecast_due = forecast is not None and len(st.step_times) < FORECAST_AFTER_STEPS

    def evaluate():
        nonlocal last_predictions
        tic = time.perf_counter()
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast, dist)
        st.eval_time += time.perf_counter() - tic
        st.evaluations += 1
        dist.check_same("ranks", M.current_ranks(model), st.step)
        dist.check_parameters(model, st.step)
        recorder.log({"step": st.step, "epoch": st.step / per_epoch, **st.last_metrics})
        if st.best_value is None or st.last_metrics[primary] > st.best_value:
            st.best_value, st.best_step, st.best_metrics = st.last_metrics[primary], st.step, dict(st.last_metrics)
        if on_eval is not None:
            # one rule for every method: no pruning before optuna.pruner.n_warmup_steps (GLoRA's reallocation or
            # later in the shipped configs), the same point of every trial
            on_eval(st.last_metrics, st.step, st.step >= (cfg.optuna.pruner.n_warmup_steps or 0))

    st.timed_from = st.timed_from or utc_now()
    clock.start()
    while st.epoch < t.epochs and st.step < total_steps:
        # each epoch's order comes from its own seed, so a resumed run replays it without saving loader state
        train_loader.generator.manual_seed(epoch_seed(cfg.seed, st.epoch))
        for i, batch in enumerate(train_loader):
            if i < st.batches_done:  # resuming mid-epoch: these batches were trained on before the kill
                continue
            if i >= n_batches or st.step >= total_steps:
                break
            part, share = dist.shard(batch)
            clock.count(part)
            running_loss += forward_backward(run.forward, part, device, autocast, accum, share)
            st.running_n += 1
            st.batches_done = i + 1
            if (i + 1) % accum and i + 1 != n_batches:
                continue
            st.step += 1
            event = optimizer_step(model, optimizer, scheduler, hook, st.step, t.max_grad_norm, dist)
            clock.step(pause=event["realloc_seconds"] if event else 0.0)
            pbar.update(1)
            if event is not None:
                dist.check_same("GLoRA's new ranks", event["new_ranks"], st.step)
                dist.check_parameters(model, st.step)
                recorder.log({"step": st.step, "event": "glora_reallocation",
                              **{k: event[k] for k in ("realloc_seconds", "trainable_params_before",
                                                       "trainable_params_after", "scores", "old_ranks",
                                                       "new_ranks")}})
            if st.step % t.log_every_steps == 0 or st.step == total_steps:
                mean_loss = (dist.sum(running_loss) / st.running_n).item()  # the host waits for the GPU here
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"training loss became {mean_loss} at optimizer step {st.step}; stopping "
                                        f"(the last good checkpoint is kept). Cause: "
                                        f"{nonfinite_cause(model, precision, scheduler.get_last_lr()[0])}")
                recorder.log({"step": st.step, "epoch": st.step / per_epoch, "train_loss": mean_loss,
                              "lr": scheduler.get_last_lr()[0], "step_time_s": clock.flush()})
                pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                running_loss.zero_()
                st.running_n = 0
            if forecast_due and len(st.step_times) >= FORECAST_AFTER_STEPS:  # GPU: step times arrive at flushes
                log.info(forecast(step_time_stats(st.step_times)["median"], st.step))
                forecast_due = False
            end_of_epoch = st.step % per_epoch == 0 or st.step == total_steps
            do_eval = end_of_epoch or (t.eval_every_steps and st.step % t.eval_every_steps == 0)
            do_checkpoint = checkpoints and (end_of_epoch or (t.checkpoint_every_steps and
                                                              st.step % t.checkpoint_every_steps == 0))
            if do_eval or do_checkpoint:
                clock.stop()
                if do_eval:
                    evaluate()
                if do_checkpoint:
                    st.running_loss = dist.sum(running_loss).item()  # the global sum; the main process resumes it
                    if end_of_epoch:  # the next checkpoint's data position starts a new epoch
                        st.epoch, st.batches_done = st.epoch + 1, 0
                    checkpoints.save(st)
                clock.start()
        if st.batches_done:  # the epoch ran out of batches without a checkpoint at its end
            st.epoch, st.batches_done = st.epoch + 1, 0
    clock.stop()
    pbar.close()
    if not last_predictions and st.last_metrics:  # resumed after the final evaluation: redo it, unlogged
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast, dist)
    dist.check_parameters(model, st.step)

    out = {k.removeprefix("validation_"): v for k, v in st.last_metrics.items()}
    out["glue_metric"] = spec.glue_metric
    out["glue_score"] = st.last_metrics.get("validation_glue_score")
    out["best_step"] = st.best_step
    out.update({f"best_{k}": v for k, v in st.best_metrics.items()})
    out.update(train_time_s=st.train_time, eval_time_s=st.eval_time, cpu_time_s=st.cpu_time,
               step_time_s=step_time_stats(st.step_times, st.step_tokens), rebuild_pause_s=st.rebuild_pause, final_step=st.step,
               evaluations=st.evaluations, resumes=st.resumes, timed_from=st.timed_from, timed_to=utc_now())
    if cfg.evaluation.save_predictions and on_eval is None and dist.main:
        save_predictions(recorder.run_dir / "predictions.csv", last_predictions)
    return out
