"""Training layer: one readable loop for LoRA, AdaLoRA and GLoRA, with the run record written as it goes."""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
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
    process writes results, logs and shows progress bars."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            if device.type == "cuda":  # NCCL's object collectives use the current device
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def device(self, name: str) -> torch.device:
        device = pick_device(name)
        if self.world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device

    def shard(self, batch: dict) -> tuple[dict, float]:
        """This process's slice of a global batch and its share of the global mean loss."""
        if self.world == 1:
            return batch, 1.0
        n = len(batch["labels"])
        part = {k: v[self.rank::self.world] for k, v in batch.items()}
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
        objs = [None] * self.world
        torch.distributed.all_gather_object(objs, obj)
        bad = [r for r, o in enumerate(objs) if o != objs[0]]
        if bad:
            raise TrainingError(f"{what} differ between processes at optimizer step {step} (process {bad[0]} vs 0)")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def check_same_config(cfg, saved_path: Path) -> None:
    """Refuse to continue a checkpoint written under another config; name the keys that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved = flat(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)) if saved_path.exists() else {}
    now = flat(OmegaConf.to_container(cfg, resolve=True))
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_DIFFER)]
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


def check_precision(precision: str, device: torch.device) -> bool:
    """True for bf16 autocast (adapters stay fp32); only on a GPU that supports it: CPU runs stay fp32."""
    if precision == "fp32":
        return False
    if precision != "bf16":
        raise TrainingError(f"hardware.precision={precision!r}: use fp32 or bf16")
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        raise TrainingError(f"hardware.precision=bf16 needs a GPU with bf16 support (device {device}); "
                            f"use hardware.precision=fp32")
    return True


def quiet(progress: bool) -> dict:
    """tqdm kwargs: off in data-parallel workers; otherwise tqdm's own defaults (and TQDM_* environment)."""
    return {} if progress else {"disable": True}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def batches_per_epoch(n_batches: int, t) -> int:
    return n_batches if t.max_train_batches is None else min(n_batches, t.max_train_batches)


@torch.no_grad()
def evaluate_split(model, loader, spec: P.TaskSpec, device, autocast, progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and mean task loss on one eval split. The loss is computed here from the logits, not
    taken from the model: PEFT's AdaLoRA adds its orthogonal regulariser to any loss it returns, which would make
    validation losses incomparable across methods."""
    model.eval()
    preds, labels, loss_sum, n = [], [], 0.0, 0
    for batch in tqdm(loader, desc="eval", leave=False, mininterval=2, **quiet(progress)):
        batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}
        y = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if spec.is_regression:
            preds.append(logits.squeeze(-1))
            loss_sum += torch.nn.functional.mse_loss(preds[-1], y.float(), reduction="sum").item()
        else:
            preds.append(logits.argmax(-1))
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        labels.append(y)
        n += len(y)
    model.train()
    return torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy(), loss_sum / max(n, 1)


def run_evaluation(model, eval_loaders, spec, device, autocast, progress: bool = True) -> tuple[dict, dict]:
    """`validation_*` metrics of every eval split (MNLI's mismatched split gets the `_mm` suffix) and predictions."""
    metrics, predictions = {}, {}
    for split, loader in eval_loaders.items():
        preds, labels, loss = evaluate_split(model, loader, spec, device, autocast, progress)
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


def save_adapter(model, path: Path) -> None:
    """PEFT save_pretrained (safetensors), written beside and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run.

def train_run(cfg, run_dir: Path, run_name: str, on_eval=None, extra_summary: dict | None = None) -> dict:
    """Train one run of `cfg` into `run_dir` and return its summary (also written to summary.json).

    `on_eval(metrics, step, adaptation_done)` makes this an Optuna trial: it trains on the training set minus a
    held-out tuning split, evaluates on that split (never on the dev set that the final run reports), and saves no
    adapter or predictions. The callback may raise to prune.
    """
    tuning = on_eval is not None
    t, d = cfg.training, cfg.dataset
    set_seed(cfg.seed)
    if cfg.hardware.deterministic:
        torch.use_deterministic_algorithms(True)
    dist = Dist()
    device = dist.device(cfg.hardware.device)
    bf16 = check_precision(cfg.hardware.precision, device)
    dist.init(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    # data first: a bad file fails before the model is loaded
    task, spec = P.task_spec(d.name)
    data = P.load_glue(task, d.data_dir, d.cache_dir)
    data["train"] = P.subsample(data["train"], d.max_train_samples)
    if tuning:
        data = P.tuning_split(data["train"], cfg.optuna.holdout_fraction)
    for split in [s for s in data if s != "train"]:
        data[split] = P.subsample(data[split], d.max_eval_samples)
    tokenizer, base = M.load_backbone(cfg.model.backbone, spec.num_labels, cfg.model.cache_dir)
    data = P.tokenize(data, tokenizer, d.max_length)
    train_loader, eval_loaders = P.make_loaders(data, tokenizer, d.batch_size, d.eval_batch_size, cfg.seed,
                                                d.num_workers)
    n_batches = batches_per_epoch(len(train_loader), t)
    per_epoch = math.ceil(n_batches / t.gradient_accumulation_steps)
    total_steps = per_epoch * t.epochs if t.max_steps is None else min(per_epoch * t.epochs, t.max_steps)
    M.check_budget(cfg, base, total_steps)
    # only now: bad input leaves results untouched; the main process owns the folder
    resuming = dist.broadcast(open_run_dir(cfg, run_dir, can_resume=not tuning) if dist.main else None)
    dist.barrier()

    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    model = M.build_adapter(cfg, base, total_steps).to(device)
    if t.gradient_checkpointing:
        model.enable_input_require_grads()
    model.train()
    optimizer = build_optimizer(model, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                              num_training_steps=total_steps)
    hook = M.make_hook(cfg, model, optimizer)
    counts_initial = M.parameter_counts(model)
    initial_ranks = M.current_ranks(model)
    log.info("%s | %s on %s | %d train examples, %d optimizer steps (%d/epoch), batch %d x accum %d | "
             "trainable params %d, rank budget %d | device %s", run_name, cfg.method_name, task,
             len(data["train"]), total_steps, per_epoch, d.batch_size, t.gradient_accumulation_steps,
             counts_initial["trainable_params"], sum(initial_ranks.values()), device)

    checkpoints = None if tuning else Checkpoints(run_dir / "checkpoint", model, optimizer, scheduler, hook,
                                                   t.keep_checkpoints, dist.main)
    state = None
    if resuming:
        state = checkpoints.restore_latest()
        dist.check_same("resumed checkpoint steps", state.step, state.step)
        if dist.main:
            truncate_history(run_dir / "history.jsonl", state.step)
    recorder = Recorder(run_dir, cfg, run_name, enabled=dist.main, resuming=bool(resuming))
    try:
        summary = _loop(cfg, model, optimizer, scheduler, hook, train_loader, eval_loaders, spec, device, autocast,
                        n_batches, total_steps, recorder, on_eval, state, checkpoints, dist)
        final_ranks = M.current_ranks(model)
        dist.check_same("final ranks", final_ranks, summary["final_step"])
    except BaseException:
        recorder.abort()
        dist.close()
        raise
    counts = M.parameter_counts(model)
    summary.update(
        run_id=cfg.run_id, run_name=run_name, method=cfg.method, method_name=cfg.method_name, task=task,
        dataset=d.name, backbone=str(cfg.model.backbone), seed=cfg.seed, status="finished",
        total_steps=total_steps, epochs=t.epochs, **counts, rank_budget_total=sum(final_ranks.values()),
        rank_budget_initial=sum(initial_ranks.values()), final_ranks=final_ranks, **hook.summary(),
        **(extra_summary or {}))
    if dist.world > 1:
        summary["processes"] = dist.world
    if dist.main and hook.summary().get("realloc_step") is not None:
        write_json_atomic(run_dir / "rank_allocation.json", hook.event)
    if dist.main and not tuning:
        save_adapter(model, run_dir / "adapter")
    recorder.finish(summary)
    dist.barrier()
    dist.close()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: resume after a kill, also after GLoRA's reallocation.

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, or from another config)."""


class Checkpoints:
    """{run_dir}/checkpoint/step-NNNNNNN/: trainable weights (safetensors), optimizer and scheduler state dicts
    (torch.save, read back with weights_only=True), the hook's state (AdaLoRA's allocator, GLoRA's scores and
    allocation: `hook.state_dict()`), RNG states and the
    loop state (data position, elapsed train time). Each is written to a temp folder and renamed, so a kill mid-write
    leaves the previous checkpoint whole; the last `keep` are kept."""

    def __init__(self, root: Path, model, optimizer, scheduler, hook, keep: int, writer: bool = True):
        self.root, self.model, self.optimizer, self.scheduler = root, model, optimizer, scheduler
        self.hook, self.keep = hook, max(1, keep)
        self.writer = writer  # data parallel: only the main process writes (every process reads)

    def save(self, st: LoopState) -> Path:
        final = self.root / f"step-{st.step:07d}"
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                   if p.requires_grad}
        bad = [n for n, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:  # never replace a good checkpoint with a broken one
            raise TrainingError(f"weights became non-finite at optimizer step {st.step} ({bad[0].removeprefix('param/')}"
                                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); stopping, the last good "
                                f"checkpoint is kept; try a lower training.learning_rate")
        if not self.writer:
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        from safetensors.torch import save_file

        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # this process's device only: a resume may see other devices
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
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
        torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available() and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"])
        st = LoopState(**state["loop"])
        st.resumes += 1
        return st


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch (epoch 0: the run's seed, as make_loaders seeds it)."""
    return seed + 1_000_003 * epoch


def forward_backward(model, batch: dict, device, autocast, accum: int = 1, share: float = 1.0) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss (detached, on the device: no host sync).
    The backward pass sees loss * share / accum, so accumulated (and, data parallel, summed) gradients are those of
    the global mean loss; `share` is this process's part of the global batch."""
    if not len(batch["labels"]):  # data parallel: a last global batch smaller than the number of processes
        return torch.zeros((), device=device)
    batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}
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


def _loop(cfg, model, optimizer, scheduler, hook, train_loader, eval_loaders, spec, device, autocast, n_batches,
          total_steps, recorder, on_eval=None, state: LoopState | None = None, checkpoints=None, dist=None) -> dict:
    """The training loop; returns the metric part of the summary."""
    dist = dist or Dist()
    t = cfg.training
    accum = t.gradient_accumulation_steps
    per_epoch = math.ceil(n_batches / accum)
    primary = f"validation_{P.primary_metric(spec)}"
    st = state or LoopState()
    last_predictions = {}
    running_loss = torch.tensor(st.running_loss if dist.main else 0.0, device=device)
    pbar = tqdm(total=total_steps, initial=st.step, desc="train", mininterval=1, **quiet(dist.main))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def evaluate():
        nonlocal last_predictions
        tic = time.perf_counter()
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast, dist.main)
        st.eval_time += time.perf_counter() - tic
        dist.check_same("ranks", M.current_ranks(model), st.step)
        recorder.log({"step": st.step, "epoch": st.step / per_epoch, **st.last_metrics})
        if st.best_value is None or st.last_metrics[primary] > st.best_value:
            st.best_value, st.best_step, st.best_metrics = st.last_metrics[primary], st.step, dict(st.last_metrics)
        if on_eval is not None:
            on_eval(st.last_metrics, st.step, hook.adaptation_done(st.step))

    sync()
    tic = time.perf_counter()
    while st.epoch < t.epochs and st.step < total_steps:
        # each epoch's order comes from its own seed, so a resumed run replays it without saving loader state
        train_loader.generator.manual_seed(epoch_seed(cfg.seed, st.epoch))
        for i, batch in enumerate(train_loader):
            if i < st.batches_done:  # resuming mid-epoch: these batches were trained on before the kill
                continue
            if i >= n_batches or st.step >= total_steps:
                break
            part, share = dist.shard(batch)
            running_loss += forward_backward(model, part, device, autocast, accum, share)
            st.running_n += 1
            st.batches_done = i + 1
            if (i + 1) % accum and i + 1 != n_batches:
                continue
            st.step += 1
            event = optimizer_step(model, optimizer, scheduler, hook, st.step, t.max_grad_norm, dist)
            pbar.update(1)
            if event is not None:
                dist.check_same("GLoRA's new ranks", event["new_ranks"], st.step)
                recorder.log({"step": st.step, "event": "glora_reallocation",
                              **{k: event[k] for k in ("realloc_seconds", "trainable_params_before",
                                                       "trainable_params_after", "scores", "old_ranks",
                                                       "new_ranks")}})
            if st.step % t.log_every_steps == 0 or st.step == total_steps:
                mean_loss = (dist.sum(running_loss) / st.running_n).item()
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"training loss became {mean_loss} at optimizer step {st.step}; stopping "
                                        f"(the last good checkpoint is kept; try a lower training.learning_rate)")
                recorder.log({"step": st.step, "epoch": st.step / per_epoch, "train_loss": mean_loss,
                              "lr": scheduler.get_last_lr()[0]})
                pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                running_loss.zero_()
                st.running_n = 0
            end_of_epoch = st.step % per_epoch == 0 or st.step == total_steps
            do_eval = end_of_epoch or (t.eval_every_steps and st.step % t.eval_every_steps == 0)
            do_checkpoint = checkpoints and (end_of_epoch or (t.checkpoint_every_steps and
                                                              st.step % t.checkpoint_every_steps == 0))
            if do_eval or do_checkpoint:
                sync()
                st.train_time += time.perf_counter() - tic
                if do_eval:
                    evaluate()
                if do_checkpoint:
                    st.running_loss = dist.sum(running_loss).item()  # the global sum; the main process resumes it
                    if end_of_epoch:  # the next checkpoint's data position starts a new epoch
                        st.epoch, st.batches_done = st.epoch + 1, 0
                    checkpoints.save(st)
                sync()
                tic = time.perf_counter()
        if st.batches_done:  # the epoch ran out of batches without a checkpoint at its end
            st.epoch, st.batches_done = st.epoch + 1, 0
    sync()
    st.train_time += time.perf_counter() - tic
    pbar.close()
    if not last_predictions and st.last_metrics:  # resumed after the final evaluation: redo it, unlogged
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast, dist.main)

    out = {k.removeprefix("validation_"): v for k, v in st.last_metrics.items()}
    out["glue_metric"] = spec.glue_metric
    out["glue_score"] = st.last_metrics.get("validation_glue_score")
    out["best_step"] = st.best_step
    out.update({f"best_{k}": v for k, v in st.best_metrics.items()})
    out.update(train_time_s=st.train_time, eval_time_s=st.eval_time, final_step=st.step, resumes=st.resumes)
    if cfg.evaluation.save_predictions and on_eval is None and dist.main:
        save_predictions(recorder.run_dir / "predictions.csv", last_predictions)
    return out
