"""Model layer: backbone loading, the adapters (LoRA, AdaLoRA, GLoRA, EVA) on PEFT, and GLoRA's allocation and rebuild.

GLoRA here is *gradient-norm aware rank allocation* on top of PEFT's own LoRA; it is unrelated to PEFT's
"GLoRA" (Generalized LoRA), which this project never imports.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import (AdaLoraConfig, EvaConfig, LoraConfig, PeftModel, TaskType, get_eva_state_dict, get_peft_model,
                  initialize_lora_eva_weights)
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"


class ModelError(ValueError):
    """A model folder, hub id or adapter setting that cannot work: the message says which and why."""


# ---------------------------------------------------------------------------------------------------------------
# Backbone.

def check_model_folder(backbone: str) -> None:
    """A backbone that names a folder must be a readable save_pretrained folder (a hub id is checked on loading)."""
    folder = Path(backbone).expanduser()
    looks_local = backbone.startswith((".", "/", "~")) or folder.exists()
    if looks_local and not ((folder / "config.json").is_file() and os.access(folder / "config.json", os.R_OK)):
        raise ModelError(f"model folder {backbone!r} not found, unreadable or without config.json "
                         f"(model.backbone must be a hub id or a save_pretrained folder)")


def load_backbone(backbone: str, num_labels: int, cache_dir: str):
    """Tokenizer and sequence-classification model from a hub id (cached in cache_dir) or a save_pretrained folder,
    in float32 whatever dtype the checkpoint is stored in: without a dtype, transformers loads the stored one
    (microsoft/deberta-v3-base is stored in float16), and PEFT up-casts the adapters but not modules_to_save, whose
    AdamW state would then be float16. hardware.precision decides the compute (TF32, bf16 autocast)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_folder(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone, cache_dir=cache_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone, num_labels=num_labels, cache_dir=cache_dir, ignore_mismatched_sizes=True,  # a fresh task head
            problem_type="regression" if num_labels == 1 else "single_label_classification", dtype=torch.float32)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load model {backbone!r} (hub or {cache_dir}): {first}") from None
    return tokenizer, model


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def stored_dtype(backbone: str, cache_dir: str) -> torch.dtype | None:
    """The floating dtype the backbone's weights file holds (the dtype `from_pretrained` would load without an explicit
    one), read from the file's header as transformers reads it; None when no weights file is found. Call it after
    `load_backbone`, so that a hub id's files are in cache_dir."""
    from transformers.modeling_utils import get_state_dict_dtype, load_state_dict
    from transformers.utils import cached_file

    for name in WEIGHT_FILES:  # transformers' own order of preference
        path = cached_file(backbone, name, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is None:
            continue
        if name.endswith(".index.json"):  # sharded: the first shard's dtype, as transformers takes it
            shard = next(iter(json.loads(Path(path).read_text())["weight_map"].values()))
            path = cached_file(backbone, shard, cache_dir=cache_dir)
        return get_state_dict_dtype(load_state_dict(path, map_location="meta"))
    return None


def target_module_names(model: nn.Module, target_modules: str) -> list[str]:
    """Names of the Linear layers PEFT will adapt (PEFT full-matches a string target against module names)."""
    pattern = re.compile(target_modules)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


# ---------------------------------------------------------------------------------------------------------------
# Adapter configs: one switch for the four methods.

def adapter_kind(cfg) -> str:
    """'lora', 'adalora', 'glora' or 'eva' (GLoRA is a LoRA whose run config has a glo_ra section, EVA one with an
    eva section)."""
    kind = cfg.model.peft.type
    if kind not in ("lora", "adalora"):
        raise ModelError(f"model.peft.type={kind!r}: use lora or adalora")
    if kind == "adalora" and "adalora" not in cfg:
        raise ModelError("model.peft.type=adalora needs an adalora section in the run config")
    if kind == "lora" and "glo_ra" in cfg and "eva" in cfg:
        raise ModelError("a run config has either a glo_ra or an eva section, not both")
    if kind == "lora" and "glo_ra" in cfg:
        return "glora"
    if kind == "lora" and "eva" in cfg:
        return "eva"
    return kind


BUDGET_UNITS = ("rank", "params")


def rank_costs(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Adapter parameters one rank of each matrix costs: in + out (a row of A and a column of B)."""
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        w = (modules[n].get_base_layer() if hasattr(modules[n], "get_base_layer") else modules[n]).weight
        out[n] = int(w.shape[0] + w.shape[1])
    return out


def resolve_glora_budget(glo_ra, costs: dict[str, int], init_rank: int) -> int:
    """glo_ra.total_rank_budget as an int in glo_ra.budget_unit: ranks (sum_k r_k) or adapter parameters
    (sum_k r_k (in_k + out_k)). 'uniform' is uniform LoRA's budget at init_rank in that unit."""
    unit = glo_ra.get("budget_unit", "rank")
    if unit not in BUDGET_UNITS:
        raise ModelError(f"glo_ra.budget_unit={unit!r}: one of {list(BUDGET_UNITS)}")
    budget = glo_ra.total_rank_budget
    if budget == "uniform":
        return init_rank * (len(costs) if unit == "rank" else sum(costs.values()))
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise ModelError(f"glo_ra.total_rank_budget={budget!r}: an integer or 'uniform'")
    return budget


def check_budget(cfg, base_model: nn.Module, total_steps: int) -> None:
    """Fail at start-up, before training, when the method's schedule or rank budget cannot be met."""
    p = cfg.model.peft
    names = target_module_names(base_model, p.target_modules)
    n = len(names)
    if n == 0:
        raise ModelError(f"model.peft.target_modules matches no Linear layer of {cfg.model.backbone!r}")
    kind = adapter_kind(cfg)
    if kind == "adalora":
        a = cfg.adalora
        if a.init_rank != p.init_rank:
            raise ModelError(f"adalora.init_rank={a.init_rank} differs from model.peft.init_rank={p.init_rank}")
        init_budget = n * a.init_rank
        if not 0 < a.total_rank_budget < init_budget:
            raise ModelError(f"adalora.total_rank_budget={a.total_rank_budget} is infeasible: it must lie in "
                             f"(0, {init_budget}) = #matrices ({n}) x init_rank ({a.init_rank})")
        if a.mask_interval < 1:
            raise ModelError(f"adalora.mask_interval={a.mask_interval}: PEFT masks every mask_interval steps, so it "
                             f"must be at least 1")
        # PEFT scores at steps < total - final_steps and masks to the final budget at step total - final_steps
        if a.adaptation_start_step >= total_steps - a.final_steps or total_steps - a.final_steps < 2:
            raise ModelError(f"AdaLoRA schedule leaves no budgeting phase: adaptation_start_step="
                             f"{a.adaptation_start_step} >= total optimizer steps ({total_steps}) - final_steps="
                             f"{a.final_steps}")
    if kind == "eva":
        check_eva(cfg.eva)
    if kind == "glora":
        g = cfg.glo_ra
        costs = rank_costs(base_model, names)
        budget = resolve_glora_budget(g, costs, p.init_rank)
        caps = _max_ranks(base_model, names, g.max_rank)
        if g.min_rank < 1:
            raise ModelError(f"glo_ra.min_rank={g.min_rank}: PEFT LoRA layers need rank >= 1")
        if g.get("budget_unit", "rank") == "rank":
            low, high, what = n * g.min_rank, sum(caps.values()), "sum of max ranks"
            if not low <= budget <= high:
                raise ModelError(f"glo_ra.total_rank_budget={budget} is infeasible: it must lie in "
                                 f"[#matrices ({n}) x min_rank ({g.min_rank}) = {low}, {what} = {high}]")
        else:
            low = sum(g.min_rank * c for c in costs.values())
            high = sum(caps[k] * c for k, c in costs.items())
            if not low <= budget <= high:
                raise ModelError(f"glo_ra.total_rank_budget={budget} adapter parameters (budget_unit=params) is "
                                 f"infeasible: it must lie in [min_rank ({g.min_rank}) x sum of (in + out) = {low}, "
                                 f"sum of max rank x (in + out) = {high}]")
        if not 1 <= g.warmup_steps < total_steps:
            raise ModelError(f"glo_ra.warmup_steps={g.warmup_steps} must lie in [1, total optimizer steps "
                             f"({total_steps})) so that the reallocation happens during training")
        if not 0.0 <= g.beta_ema < 1.0:
            raise ModelError(f"glo_ra.beta_ema={g.beta_ema} must lie in [0, 1)")
        if g.score not in SCORES:
            raise ModelError(f"glo_ra.score={g.score!r}: one of {sorted(SCORES)}")
        if SCORES[g.score].adapter is None and (cfg.get("training") or {}).get("gradient_checkpointing"):
            raise ModelError(f"glo_ra.score={g.score} reads each layer's input and output gradient, which "
                             f"training.gradient_checkpointing=true recomputes: turn one of them off")


def check_eva(e) -> None:
    """EVA's keys, before its data pass: a one-line error, not EvaConfig's assertion or a crash mid-pass.
    (Their defaults live in the EVA run configs, so main's type check does not see them.)"""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not number(e.rho) or e.rho < 1:
        raise ModelError(f"eva.rho={e.rho!r}: a number >= 1 (a matrix gets at most rho x init_rank)")
    if not number(e.tau) or not 0 <= e.tau <= 1:
        raise ModelError(f"eva.tau={e.tau!r}: a number in [0, 1]")
    for key in ("whiten", "adjust_scaling_factors"):
        if not isinstance(e[key], bool):
            raise ModelError(f"eva.{key}={e[key]!r}: expected true or false")
    if e.batch_size is not None and not count(e.batch_size):
        raise ModelError(f"eva.batch_size={e.batch_size!r}: an integer >= 1, or null for the training batch size")
    if not count(e.max_passes):
        raise ModelError(f"eva.max_passes={e.max_passes!r}: an integer >= 1")


def _max_ranks(model: nn.Module, names: list[str], max_rank: int | None) -> dict[str, int]:
    """Per-matrix rank cap: min(in, out) of the matrix, and glo_ra.max_rank when set."""
    modules = dict(model.named_modules())
    caps = {}
    for n in names:
        m = modules[n]
        w = (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight
        cap = min(w.shape)
        caps[n] = cap if max_rank is None else min(cap, max_rank)
    return caps


def build_adapter(cfg, base_model: nn.Module, total_steps: int) -> PeftModel:
    """Wrap the backbone in the run's PEFT adapter; classifier and pooler are trained and saved with it."""
    p = cfg.model.peft
    common = dict(task_type=TaskType.SEQ_CLS, target_modules=p.target_modules, lora_alpha=p.lora_alpha,
                  lora_dropout=p.lora_dropout, modules_to_save=list(p.modules_to_save))
    kind = adapter_kind(cfg)
    if kind == "adalora":
        a = cfg.adalora
        n = len(target_module_names(base_model, p.target_modules))
        config = AdaLoraConfig(
            init_r=a.init_rank, target_r=max(1, math.ceil(a.total_rank_budget / n)), tinit=a.adaptation_start_step,
            tfinal=a.final_steps, deltaT=a.mask_interval, beta1=a.beta1, beta2=a.beta2,
            orth_reg_weight=a.orth_reg_weight, total_step=total_steps, **common)
        model = get_peft_model(base_model, config)
        # PEFT's target is target_r x #matrices, an integer multiple; the config's total budget is exact instead.
        model.base_model.rankallocator.target_bgt = int(a.total_rank_budget)
        return model
    if kind == "eva":
        e = cfg.eva
        # A classifier's labels are one per sequence, not per token: padding is masked by the attention mask alone.
        eva = EvaConfig(rho=e.rho, tau=e.tau, use_label_mask=False, whiten=e.whiten,
                        adjust_scaling_factors=e.adjust_scaling_factors)
        return get_peft_model(base_model, LoraConfig(r=p.init_rank, use_rslora=p.use_rslora, init_lora_weights="eva",
                                                     eva_config=eva, **common))
    config = LoraConfig(r=p.init_rank, use_rslora=p.use_rslora, **common)
    return get_peft_model(base_model, config)


# ---------------------------------------------------------------------------------------------------------------
# EVA (PEFT's explained-variance adaptation): a data pass before training sets each layer's rank and A.

class _CountingLoader:
    """A loader that counts the batches drawn from it (EVA cycles until every layer's SVD has converged)."""

    def __init__(self, loader):
        self.loader, self.batches = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            yield dict(batch)  # PEFT's EVA wants a plain dict, not the collator's BatchEncoding


def _eva_token_mask(inputs: dict, peft_config) -> torch.Tensor:
    """(B, T) bool: the tokens that are not padding (a classifier's labels are per sequence, so no label mask)."""
    return inputs["attention_mask"].bool()


def _eva_layer_rows(layer_input, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The rows an adapted matrix transforms: its non-padding token inputs; any other call of it (DeBERTa's query and
    key also project the relative-position embeddings, (1, 2k, d)) is taken whole, as the matrix sees it."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def eva_initialize(model: PeftModel, loader, device: torch.device, progress: bool = True,
                   max_passes: int = 500) -> tuple[dict, dict]:
    """EVA's data pass through PEFT's `initialize_lora_eva_weights`: forward passes (PEFT switches to eval mode, so no
    dropout) over `loader`'s training batches, an incremental SVD of each adapted layer's inputs, the ranks
    redistributed under uniform LoRA's total (at most rho x r per layer, 0 allowed: that layer loses its adapter) and
    A set to the top right-singular vectors. The global RNG is forked around it, so training's dropout masks are what
    they would be without the pass. Returns (eva_state_dict on the CPU, info: seconds, batches, ranks)."""
    counting = _CountingLoader(loader)
    forwards = 0

    def forward(m, inputs):
        nonlocal forwards
        forwards += 1
        if forwards > max_passes:  # PEFT cycles the loader until convergence, with no cap of its own
            raise ModelError(f"EVA's data pass did not converge within eva.max_passes={max_passes} forward passes "
                             f"(eva.tau={model.peft_config[ADAPTER].eva_config.tau}); a few distinct batches that "
                             f"alternate can keep components from settling: raise eva.batch_size or lower eva.tau")
        return m(**{k: v for k, v in inputs.items() if k not in ("idx", "labels")})

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic, cpu = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        state = get_eva_state_dict(model, counting, forward_fn=forward, prepare_model_inputs_fn=_eva_token_mask,
                                   prepare_layer_inputs_fn=_eva_layer_rows, gather_distributed_inputs=False,
                                   show_progress_bar=progress)
        initialize_lora_eva_weights(model, eva_state_dict=dict(state), show_progress_bar=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {"eva_init_s": time.perf_counter() - tic, "eva_init_cpu_s": time.process_time() - cpu,
            "eva_batches": counting.batches, "eva_forward_passes": forwards, "eva_ranks": {_base_name(k): int(v.shape[0]) for k, v in state.items()}}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, info


def eva_restore(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """A resumed EVA run: the saved data-pass result rebuilds the same ranks (the checkpoint then loads the weights)."""
    device = next(model.parameters()).device
    initialize_lora_eva_weights(model, eva_state_dict={k: v.to(device) for k, v in state.items()},
                                show_progress_bar=False)


def prepare_adapter(cfg, model: PeftModel, make_loader, device: torch.device, saved: dict | None = None,
                    progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """A method's work between building the adapter and building the optimizer (the parameters' shapes must be final
    by then): EVA's data pass, or on resume its saved result. Returns (tensors to keep with the run, summary values);
    nothing for the other methods. `make_loader(batch_size)`: a loader of training batches with its own generator."""
    if adapter_kind(cfg) != "eva":
        return {}, {}
    if saved is not None:
        eva_restore(model, saved)
        return saved, {}
    e = cfg.eva
    return eva_initialize(model, make_loader(e.get("batch_size") or cfg.dataset.batch_size), device, progress,
                          e.get("max_passes", 500))


# ---------------------------------------------------------------------------------------------------------------
# Parameter and rank accounting.

def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Adapted layers by their name in the base model (PEFT's `base_model.model.` prefix removed)."""
    return {_base_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def current_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every adapted matrix; for AdaLoRA the unmasked triplets of its latest rank pattern."""
    pattern = getattr(model.peft_config[ADAPTER], "rank_pattern", None)
    if isinstance(model.peft_config[ADAPTER], AdaLoraConfig) and pattern:
        return {k.replace(f".lora_E.{ADAPTER}", "").removeprefix("base_model.model."): int(sum(v))
                for k, v in pattern.items()}
    return {n: int(m.r[ADAPTER]) for n, m in lora_layers(model).items()}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters, split into adapter (lora_*) and head (classifier, pooler), plus the adapter's effective
    size at the final ranks (AdaLoRA trains init_rank triplets and only prunes them by masking)."""
    trainable = adapter = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            adapter += p.numel() if ".lora_" in n else 0
    effective = 0
    ranks = current_ranks(model)
    for n, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        per_rank = base.in_features + base.out_features + (1 if hasattr(layer, "lora_E") else 0)
        effective += ranks[n] * per_rank
    return {"trainable_params": trainable, "adapter_params": adapter, "head_params": trainable - adapter,
            "adapter_params_effective": effective}


# ---------------------------------------------------------------------------------------------------------------
# GLoRA, step 3: the allocation (pure: no torch, no model).

def allocate_ranks(scores: dict[str, float], total: int, min_rank: int = 1,
                   max_rank: dict[str, int] | int | None = None, costs: dict[str, int] | None = None) -> dict[str, int]:
    """r_k = round(lam * g_k) within [min_rank, max_rank_k], with lam such that the budget sum_k c_k r_k = `total`.

    Rank budget (`costs` None, c_k = 1): lam = total / sum_j g_j, so r_k = round(total * s_k), corrected so that
    sum_k r_k = total exactly. Parameter budget (c_k = in_k + out_k, the parameters one rank of matrix k costs): the
    ranks stay proportional to the scores and the budget is met from below, to within one rank of the cheapest matrix
    that can still grow. The real-valued target x_k = clip(lam * g_k, min, max) is found by bisection on lam, so the
    bounds are met by shifting rank between the other matrices rather than by clipping after rounding. Rounding:
    every x_k is floored, then one rank at a time goes to the largest fractional part that the budget still affords
    (ties: higher score, then name). All-zero scores give a uniform split. What one rank costs differs between
    matrices, so the last ranks may go past the proportional target: a cheap matrix can end about (dearest cost / its
    cost) ranks above ceil(x_k) when the dearer ones no longer fit what is left; with adapter costs 1,536 and 3,840
    (DeBERTa-v3-base's attention and FFN matrices) that is at most 2-3 ranks (1.3 in a randomised check).
    """
    names = sorted(scores)
    cost = {n: 1 for n in names} if costs is None else {n: int(costs[n]) for n in names}
    caps = {n: (max_rank.get(n, total) if isinstance(max_rank, dict) else (total if max_rank is None else max_rank))
            for n in names}
    if any(not math.isfinite(scores[n]) or scores[n] < 0 for n in names):
        raise ValueError(f"scores must be finite and non-negative: {scores}")
    if any(c < 1 for c in cost.values()):
        raise ValueError(f"rank costs must be positive integers: {cost}")
    if not sum(min_rank * cost[n] for n in names) <= total <= sum(caps[n] * cost[n] for n in names):
        raise ValueError(f"{'rank' if costs is None else 'parameter'} budget {total} is infeasible for "
                         f"{len(names)} matrices within [{min_rank}, max_rank]")
    top = max(scores.values())
    # scaled to (0, 1]; all-zero scores: uniform; a 1e-12 floor lets a zero-score matrix take rank beyond min_rank
    # when the bounds leave no other way to meet the budget
    scores = {n: 1.0 for n in names} if top == 0 else {n: scores[n] / top + 1e-12 for n in names}

    def target(lam: float) -> dict[str, float]:
        return {n: min(max(lam * scores[n], min_rank), caps[n]) for n in names}

    def spent(x: dict) -> float:
        return sum(cost[n] * x[n] for n in names)

    lo, hi = 0.0, 1.0
    while spent(target(hi)) < total:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(target(mid)) < total else (lo, mid)
    x = target(hi)
    ranks = {n: min(max(math.floor(x[n] + 1e-9), min_rank), caps[n]) for n in names}
    while spent(ranks) > total:  # float slack at a bound: take back from the smallest remainders
        n = min((n for n in names if ranks[n] > min_rank), key=lambda n: (x[n] - ranks[n], scores[n], n))
        ranks[n] -= 1
    left = total - spent(ranks)
    while True:  # the largest remainder the budget still affords, one rank at a time
        fits = [n for n in names if ranks[n] < caps[n] and cost[n] <= left]
        if not fits:
            break
        n = min(fits, key=lambda n: (-(x[n] - ranks[n]), -scores[n], n))
        ranks[n] += 1
        left -= cost[n]
    assert left >= 0 and (costs is not None or left == 0), (ranks, total)
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# GLoRA, step 4: the function-preserving rebuild.

def component_importance(layer: LoraLayer) -> torch.Tensor:
    """Importance of each rank-1 component i of B @ A: ||b_i|| * ||a_i|| (the Frobenius norm of its contribution)."""
    a = layer.lora_A[ADAPTER].weight  # (r, in)
    b = layer.lora_B[ADAPTER].weight  # (out, r)
    return a.norm(dim=1) * b.norm(dim=0)


@torch.no_grad()
def rebuild_lora_layer(layer: LoraLayer, new_rank: int, config: LoraConfig) -> tuple[torch.Tensor, nn.Parameter,
                                                                                      nn.Parameter]:
    """Resize one PEFT LoRA layer in place and return (kept component indices, old A, old B).

    Kept components (the most important ones, in their original order) keep their values; added ones get LoRA's
    init (A kaiming-uniform, B = 0, so they contribute nothing yet); dropped ones go. alpha is rescaled so PEFT's
    `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA) does not change with r.
    """
    if config.lora_bias:
        raise ModelError("GLoRA rebuild does not support lora_bias=True")
    old_a, old_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    r_old = old_a.shape[0]
    scaling = layer.scaling[ADAPTER]
    keep_n = min(r_old, new_rank)
    keep = torch.argsort(component_importance(layer), descending=True, stable=True)[:keep_n].sort().values
    alpha = scaling * (math.sqrt(new_rank) if config.use_rslora else new_rank)
    layer.update_layer(ADAPTER, new_rank, lora_alpha=alpha, config=config)
    new_a, new_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    # update_layer casts to the base layer's dtype; keep the adapter's own dtype (fp32 under bf16 autocast).
    new_a.to(device=old_a.device, dtype=old_a.dtype)
    new_b.to(device=old_b.device, dtype=old_b.dtype)
    new_a.weight[:keep_n] = old_a[keep]
    new_b.weight[:, :keep_n] = old_b[:, keep]
    layer.scaling[ADAPTER] = scaling  # exact: alpha / r can differ from `scaling` in the last bit
    return keep, old_a, old_b


ADDED = "glora_added"  # optimizer-state key of a rebuilt tensor: where its added components start, and when


def _move_optimizer_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                          keep: torch.Tensor, dim: int) -> None:
    """Point the optimizer at `new` instead of `old`: moments of kept components are carried (sliced along `dim`),
    moments of added components start at zero, scalars such as AdamW's step count are kept. Added components are
    marked (ADDED: their first index along `dim` and the step they were born at) so that AddedComponentsAdamW gives
    them the bias correction of a fresh parameter."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    carried = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            fresh = torch.zeros_like(new)
            fresh.narrow(dim, 0, keep.numel()).copy_(value.index_select(dim, keep.to(value.device)))
            carried[key] = fresh
        elif key != ADDED:
            carried[key] = value.clone() if torch.is_tensor(value) else value
    if keep.numel() < new.shape[dim] and "step" in state:
        carried[ADDED] = {"dim": dim, "start": keep.numel(), "birth_step": int(state["step"])}
    optimizer.state[new] = carried


def _added(t: torch.Tensor, info: dict) -> torch.Tensor:
    """The view of a rebuilt tensor (or of its moments) that holds the added components."""
    return t.narrow(info["dim"], info["start"], t.shape[info["dim"]] - info["start"])


class AddedComponentsAdamW:
    """AdamW for components a rebuild added, as if they were parameters created at the rebuild.

    PyTorch's AdamW keeps one step counter per tensor, so the added components' fresh (zero) moments would get the
    bias correction of the tensor's late step: updates several times larger than AdamW gives a new parameter, for
    hundreds of steps. Around every `optimizer.step()` (the optimizer's own step hooks) this redoes, on the added
    slices only, AdamW's update with their own age (steps since the rebuild), from their pre-step values and the
    moments PyTorch just updated: exactly what a fresh `torch.optim.AdamW` parameter fed the same gradients gets.
    Kept components are untouched. Its bookkeeping (ADDED) lives in the optimizer state, so checkpoints carry it;
    once both bias corrections of an added slice have converged to 1, its mark is dropped and it costs nothing.
    """

    RETIRE = 1e-9  # beta ** age below this: the tensor's own correction is the fresh one to float32 precision

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.AdamW):
            raise ModelError(f"GLoRA's rebuild corrects AdamW's state; got {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("fused"):
                raise ModelError("GLoRA's rebuild supports AdamW without amsgrad/maximize/capturable/fused")
        self.optimizer = optimizer
        self._before: dict = {}
        self.handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer) -> "AddedComponentsAdamW":
        """One per optimizer."""
        if getattr(optimizer, "_glora_added", None) is None:
            optimizer._glora_added = cls(optimizer)
        return optimizer._glora_added

    def _buckets(self) -> dict:
        """(group index, birth step) -> [(param, mark)] of the marked parameters this step updates."""
        out: dict = {}
        for i, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                info = self.optimizer.state[p].get(ADDED) if p in self.optimizer.state else None
                if info is not None and p.grad is not None:  # AdamW skips a parameter without grad
                    out.setdefault((i, info["birth_step"]), []).append((p, info))
        return out

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs) -> None:
        # the decoupled weight decay step of a fresh parameter, from the values before PyTorch's step
        self._before = {}
        for (i, _), items in self._buckets().items():
            group = optimizer.param_groups[i]
            before = torch._foreach_mul([_added(p, info) for p, info in items], 1 - group["lr"] * group["weight_decay"])
            self._before.update({p: b for (p, _), b in zip(items, before)})

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        for (i, birth), items in self._buckets().items():
            items = [(p, info) for p, info in items if p in self._before]
            if not items:
                continue
            group = optimizer.param_groups[i]
            beta1, beta2 = group["betas"]
            age = int(optimizer.state[items[0][0]]["step"]) - birth
            bc1, bc2 = 1 - beta1 ** age, 1 - beta2 ** age
            exp_avg = [_added(optimizer.state[p]["exp_avg"], info) for p, info in items]
            denom = torch._foreach_sqrt([_added(optimizer.state[p]["exp_avg_sq"], info) for p, info in items])
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, group["eps"])
            fresh = [self._before[p] for p, _ in items]
            torch._foreach_addcdiv_(fresh, exp_avg, denom, value=-group["lr"] / bc1)
            torch._foreach_copy_([_added(p, info) for p, info in items], fresh)
            if max(beta1, beta2) ** age < self.RETIRE:
                for p, _ in items:
                    del optimizer.state[p][ADDED]
        self._before = {}


def rebuild_lora_layers(model: PeftModel, new_ranks: dict[str, int],
                        optimizer: torch.optim.Optimizer | None = None, exact_added: bool = True) -> dict[str, int]:
    """Rebuild every adapted layer whose rank changes, carry its optimizer state, and record the new ranks and alphas
    in the LoraConfig's rank_pattern / alpha_pattern so that `save_pretrained` writes a stock PEFT adapter.
    With an optimizer, added components get a fresh parameter's AdamW updates (AddedComponentsAdamW) unless
    `exact_added` is False (the uncorrected behaviour, kept only to measure its error).

    Returns the old ranks."""
    config = model.peft_config[ADAPTER]
    layers = lora_layers(model)
    old_ranks = {n: int(m.r[ADAPTER]) for n, m in layers.items()}
    if set(new_ranks) != set(layers):
        raise ValueError("new_ranks must name exactly the adapted layers")
    if optimizer is not None and exact_added:
        AddedComponentsAdamW.attach(optimizer)
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    for name, layer in layers.items():
        if new_ranks[name] == old_ranks[name]:
            continue
        keep, old_a, old_b = rebuild_lora_layer(layer, new_ranks[name], config)
        if optimizer is not None:
            _move_optimizer_state(optimizer, old_a, layer.lora_A[ADAPTER].weight, keep, dim=0)
            _move_optimizer_state(optimizer, old_b, layer.lora_B[ADAPTER].weight, keep, dim=1)
        rank_pattern[name] = int(new_ranks[name])
        alpha_pattern[name] = float(layer.lora_alpha[ADAPTER])
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    return old_ranks


# ---------------------------------------------------------------------------------------------------------------
# Per-optimizer-step hooks: the one place where the methods differ inside the training loop.

def _score_grad_norm(params, grads):
    return torch.stack(torch._foreach_norm(grads))


def _score_per_param(params, grads):
    return torch.stack(torch._foreach_norm(grads)) / torch.tensor(
        [math.sqrt(p.numel()) for p in params], device=grads[0].device)


def _score_sensitivity(params, grads):
    return torch.stack(torch._foreach_norm(torch._foreach_mul(params, grads)))


@dataclass(frozen=True)
class Score:
    """One value of glo_ra.score. `adapter`: per adapter tensor from its gradient (A_k, B_k interleaved; a matrix
    combines them as sqrt(a^2 + b^2)); None: the full weight gradient dL/dW_k (WeightGradients). `shuffled`: the
    allocation gets the real EMA scores permuted across matrices (a permutation drawn from the run's seed)."""
    adapter: object | None
    shuffled: bool = False


SCORES = {
    "grad_norm": Score(_score_grad_norm),              # ||dL/dA||_F, ||dL/dB||_F: the hypothesis as stated
    "grad_norm_per_param": Score(_score_per_param),    # divided by sqrt(numel): RMS gradient, removes the width bias
    "sensitivity": Score(_score_sensitivity),          # ||theta * dL/dtheta||_F, as AdaLoRA's importance
    "shuffled": Score(_score_grad_norm, shuffled=True),  # control: the same rank histogram at random places
    "delta_grad": Score(None),                         # ||dL/dW_k||_F of the full weight: what the hypothesis names
}


class WeightGradients:
    """||dL/dW_k||_F of every adapted matrix's full (frozen) weight, from the layer's input x and output gradient
    delta: dL/dW_k = delta^T x over the tokens, one extra (out x in) matmul per call of the layer (DeBERTa calls its
    query and key projections twice, on the hidden states and on the relative position embeddings), summed over
    calls, micro-batches and processes. For the warm-up only: `close()` removes the hooks.

    With one micro-batch per optimizer step on one process, the norm is taken as soon as the layer's backward is
    done (its lora_A's gradient is accumulated, which waits for every call) and the sum freed, so no (out x in)
    matrix outlives its layer's backward (on DeBERTa-v3-base the sums held to the step's end were 340 MB). With
    gradient accumulation or data parallelism the norm is that of the sum over micro-batches and processes, not
    the sum of their norms, so the sums are kept (float32) until `norms()`. The product runs in the forward pass's
    compute dtype (bfloat16 under bf16 autocast, with float32 accumulation), its sum and norm in float32."""

    def __init__(self, layers: dict[str, LoraLayer], micro_batches: int = 1):
        self.names = list(layers)
        self.shapes = {n: layer.get_base_layer().weight.shape for n, layer in layers.items()}
        self.accumulate = micro_batches > 1 or _world_size() > 1
        self.sums: dict[str, torch.Tensor] = {}  # (out, in) sums; () norms once a layer is done (not accumulating)
        self.handles = [layer.register_forward_hook(self._capture(n)) for n, layer in layers.items()]
        if not self.accumulate:
            self.handles += [layer.lora_A[ADAPTER].weight.register_post_accumulate_grad_hook(self._done(n))
                             for n, layer in layers.items()]

    def _capture(self, name: str):
        def forward_hook(module, args, output):
            if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
                return  # evaluation
            x = args[0].detach()
            device_type = x.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32

            def backward_hook(delta):
                w = (delta.reshape(-1, delta.shape[-1]).to(dtype).T @ x.reshape(-1, x.shape[-1]).to(dtype)).float()
                if name in self.sums:
                    assert self.sums[name].ndim == 2, f"{name}: a second micro-batch, but micro_batches=1"
                    self.sums[name].add_(w)
                else:
                    self.sums[name] = w

            output.register_hook(backward_hook)
        return forward_hook

    def _done(self, name: str):
        def hook(param):  # every call of the layer has been back-propagated: (out, in) -> ()
            if name in self.sums:
                self.sums[name] = torch.linalg.matrix_norm(self.sums[name])
        return hook

    def norms(self, device) -> torch.Tensor:
        """(K,) norms of this optimizer step's weight gradients (a matrix without one counts 0); resets the sums."""
        multi = _world_size() > 1
        out = []
        for n in self.names:
            w = self.sums.pop(n, None)
            if w is None:
                w = torch.zeros(self.shapes[n], device=device)
            if multi:
                torch.distributed.all_reduce(w)
            out.append(w if w.ndim == 0 else torch.linalg.matrix_norm(w))
        return torch.stack(out)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.sums = [], {}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AdapterHook:
    """Plain LoRA: nothing to do. The loop calls, once per optimizer step:
    `on_gradients(step)` after backward/accumulation/unscaling and before clipping, then
    `optimizer.step(); scheduler.step(); event = on_optimizer_step(step)` before `optimizer.zero_grad()`."""

    def __init__(self, model: PeftModel):
        self.model = model

    def on_gradients(self, step: int) -> None:
        pass

    def on_optimizer_step(self, step: int) -> dict | None:
        return None

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint needs to continue this hook exactly: tensors (safetensors) and JSON-able values."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Called before the checkpoint's weights are loaded into the model."""


class AdaLoraHook(AdapterHook):
    """PEFT's RankAllocator: importance scores and budget masking (after step, before zero_grad: it reads p.grad)."""

    SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the RankAllocator's per-parameter dicts

    def on_optimizer_step(self, step: int) -> dict | None:
        self.model.base_model.update_and_allocate(step)
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        allocator = self.model.base_model.rankallocator
        return ({f"{kind}/{n}": t for kind in self.SCORES for n, t in getattr(allocator, kind).items()},
                {"rank_pattern": self.model.peft_config[ADAPTER].rank_pattern})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        allocator = self.model.base_model.rankallocator
        device = next(self.model.parameters()).device
        for kind in self.SCORES:
            setattr(allocator, kind, {k.removeprefix(f"{kind}/"): v.to(device) for k, v in tensors.items()
                                      if k.startswith(f"{kind}/")})
        self.model.peft_config[ADAPTER].rank_pattern = meta["rank_pattern"]


@dataclass
class GloraHook(AdapterHook):
    """GLoRA: an EMA of each matrix's score (glo_ra.score: by default its adapter gradient norm) during warm-up, then
    one reallocation and rebuild.

    The EMA lives on the device and is updated with fused foreach ops, so warm-up adds no host sync per step; after
    the reallocation the hook does nothing and the step costs what LoRA's costs (plus AdamW's fresh-component
    correction on the added slices, AddedComponentsAdamW).
    """

    model: PeftModel
    optimizer: torch.optim.Optimizer
    total_rank_budget: int
    warmup_steps: int
    beta_ema: float = 0.9
    score: str = "grad_norm"
    min_rank: int = 1
    max_rank: int | None = None
    budget_unit: str = "rank"
    seed: int = 0
    exact_added: bool = True  # False: added components without AddedComponentsAdamW (only to measure that error)
    micro_batches: int = 1    # per optimizer step (training.gradient_accumulation_steps): delta_grad sums over them
    names: list[str] = field(init=False)
    ema: torch.Tensor = field(init=False)
    n_updates: int = field(init=False, default=0)
    event: dict | None = field(init=False, default=None)

    def __post_init__(self):
        layers = lora_layers(self.model)
        self.names = list(layers)
        self._spec = SCORES[self.score]
        self._tensors = [t for n in self.names
                         for t in (layers[n].lora_A[ADAPTER].weight, layers[n].lora_B[ADAPTER].weight)]
        self._weights = WeightGradients(layers, self.micro_batches) if self._spec.adapter is None else None
        self.ema = torch.zeros(len(self.names), device=self._tensors[0].device)

    def on_gradients(self, step: int) -> None:
        if self.event is not None or step > self.warmup_steps:
            return
        if self._weights is not None:
            g = self._weights.norms(self.ema.device).float()
        else:
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self._tensors]  # no grad: 0
            per_tensor = self._spec.adapter(self._tensors, [g.float() for g in grads]).float()
            g = per_tensor.view(-1, 2).square().sum(dim=1).sqrt()  # (K,): A and B together
        ema = self.beta_ema * self.ema + (1 - self.beta_ema) * g
        # A step with non-finite gradients is skipped, without a host sync.
        self.ema = torch.where(torch.isfinite(g).all(), ema, self.ema)
        self.n_updates += 1

    def on_optimizer_step(self, step: int) -> dict | None:
        if self.event is not None or step != self.warmup_steps:
            return None
        return self.reallocate(step)

    def allocation_scores(self) -> tuple[dict[str, float], list[str] | None]:
        """The scores the allocation uses, and for glo_ra.score=shuffled the permutation: matrix k gets the real EMA
        score of matrix permutation[k]."""
        scores = dict(zip(self.names, self.ema.tolist()))
        if not self._spec.shuffled:
            return scores, None
        order = torch.randperm(len(self.names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        permutation = [self.names[i] for i in order]
        return {n: scores[src] for n, src in zip(self.names, permutation)}, permutation

    def reallocate(self, step: int) -> dict:
        """Steps 3 and 4: shares of the budget from the EMA scores, then the in-place rebuild."""
        device = self.ema.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        scores = dict(zip(self.names, self.ema.tolist()))
        used, permutation = self.allocation_scores()
        base = self.model.base_model.model
        caps = _max_ranks(base, self.names, self.max_rank)
        costs = rank_costs(base, self.names) if self.budget_unit == "params" else None
        new_ranks = allocate_ranks(used, self.total_rank_budget, self.min_rank, caps, costs)
        before = parameter_counts(self.model)
        old_ranks = rebuild_lora_layers(self.model, new_ranks, self.optimizer, self.exact_added)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
        after = parameter_counts(self.model)
        total = sum(used.values()) or 1.0
        self._end_warm_up({"step": step, "score": self.score, "scores": scores,
                           "shares": {n: v / total for n, v in used.items()},
                           **({"permutation": permutation, "scores_used": used} if permutation else {}),
                           "old_ranks": old_ranks, "new_ranks": new_ranks, "budget_unit": self.budget_unit,
                           "total_rank_budget": self.total_rank_budget, "realloc_seconds": seconds,
                           "trainable_params_before": before["trainable_params"],
                           "trainable_params_after": after["trainable_params"],
                           "adapter_params_before": before["adapter_params"],
                           "adapter_params_after": after["adapter_params"]})
        return self.event

    def _end_warm_up(self, event: dict) -> None:
        self.event = event
        self._tensors = []  # warm-up is over: drop references to the replaced parameters
        if self._weights is not None:
            self._weights.close()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"ema": self.ema}, {"n_updates": self.n_updates, "event": self.event}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["event"]:  # taken after the reallocation: rebuild to its ranks so that the weights fit
            rebuild_lora_layers(self.model, meta["event"]["new_ranks"], self.optimizer)
            self._end_warm_up(meta["event"])
        self.ema = tensors["ema"].to(self.ema.device)
        self.n_updates = meta["n_updates"]

    def summary(self) -> dict:
        head = {"glora_score": self.score, "budget_unit": self.budget_unit, "glora_budget": self.total_rank_budget}
        if self.event is None:
            return {**head, "realloc_step": None}
        return {**head, "realloc_step": self.event["step"], "realloc_seconds": self.event["realloc_seconds"],
                "trainable_params_initial": self.event["trainable_params_before"]}


def make_hook(cfg, model: PeftModel, optimizer: torch.optim.Optimizer) -> AdapterHook:
    """The method switch for the training loop."""
    kind = adapter_kind(cfg)
    if kind == "adalora":
        return AdaLoraHook(model)
    if kind == "glora":
        g = cfg.glo_ra
        names = list(lora_layers(model))
        budget = resolve_glora_budget(g, rank_costs(model.base_model.model, names), cfg.model.peft.init_rank)
        return GloraHook(model, optimizer, budget, g.warmup_steps, g.beta_ema, g.score, g.min_rank, g.max_rank,
                         g.get("budget_unit", "rank"), int(cfg.get("seed", 0)),
                         micro_batches=int((cfg.get("training") or {}).get("gradient_accumulation_steps", 1)))
    return AdapterHook(model)
