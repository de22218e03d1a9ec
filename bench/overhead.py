"""Step-time overhead of AdaLoRA and GLoRA against LoRA, and of the project's training step against a bare PEFT loop.

Same process, same architecture and initial weights, same batches; methods are interleaved (A B C ... A B C ...) after
warm-up steps, so machine noise hits all alike. Reports the median and spread of the measured steps.

    uv run python bench/overhead.py                       # DeBERTa-v3-base architecture (random init), CPU
    uv run python bench/overhead.py --device cuda --batch-size 32 --seq-len 256
    uv run python bench/overhead.py --model path/to/save_pretrained_folder
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src import model as M  # noqa: E402
from src import train as T  # noqa: E402

CONFIG = OmegaConf.load(REPO / "config" / "config.yaml")
TARGETS = {  # the run configs own the target regexes
    "deberta-v2": CONFIG.model.peft.target_modules,
    "bert": OmegaConf.load(REPO / "config/run/comparative-2-MiniLM-L6-22M--GLUE-SST-2.yaml").model.peft.target_modules,
}


def deberta_v3_base():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0, pooler_hidden_size=768, pooler_dropout=0.0, num_labels=3)
    return DebertaV2ForSequenceClassification(config)


def method_cfg(kind: str, target_modules: str, init_rank: int = 8, budget: int | None = None, warmup: int = 10**9,
               score: str = "grad_norm"):
    peft = {"type": "adalora" if kind == "adalora" else "lora", "init_rank": init_rank, "lora_alpha": 16,
            "lora_dropout": 0.0, "use_rslora": False, "target_modules": target_modules,
            "modules_to_save": ["classifier", "pooler"]}
    cfg = {"model": {"backbone": "bench", "peft": peft}}
    if kind == "adalora":  # in the budgeting phase the whole time: scores every step, masking every 10
        cfg["adalora"] = {"total_rank_budget": budget, "init_rank": init_rank, "beta1": 0.85, "beta2": 0.85,
                          "orth_reg_weight": 0.1, "adaptation_start_step": 0, "final_steps": 0, "mask_interval": 10}
    if kind == "glora":
        cfg["glo_ra"] = {"total_rank_budget": budget, "budget_unit": "rank", "beta_ema": 0.9, "warmup_steps": warmup,
                         "score": score, "min_rank": 1, "max_rank": None}
    return OmegaConf.create(cfg)


class Runner:
    """One method: its own copy of the model, optimizer, scheduler and hook, and a step function to time."""

    def __init__(self, name, cfg, base, device, bare=False, total_steps=10**6):
        self.name, self.bare = name, bare
        self.model = M.build_adapter(cfg, copy.deepcopy(base), total_steps).to(device)
        self.model.train()
        t = OmegaConf.create({"optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.01,
                              "adam_betas": [0.9, 0.999], "adam_eps": 1e-8})
        self.optimizer = T.build_optimizer(self.model, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.hook = M.make_hook(cfg, self.model, self.optimizer)
        self.step_no, self.times, self.peak = 0, [], None

    def step(self, batch, device, autocast):
        self.step_no += 1
        if self.bare:  # what a user would write with PEFT alone
            with autocast():
                loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        loss = T.forward_backward(self.model, batch, device, autocast)
        T.optimizer_step(self.model, self.optimizer, self.scheduler, self.hook, self.step_no, 1.0)
        return loss


def timed(runner, batch, device, autocast):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    loss = runner.step(batch, device, autocast)
    loss.item()  # same sync point for every method
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        runner.peak = max(runner.peak or 0, torch.cuda.max_memory_allocated(device))
    return time.perf_counter() - tic


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="save_pretrained folder (default: DeBERTa-v3-base architecture, random init)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (adapters stay fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # the run's own precision check: bf16 only where the device has it natively (an error otherwise)
    T.check_precision("bf16" if args.bf16 else "fp32", device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    if args.model:
        from transformers import AutoModelForSequenceClassification

        # float32 whatever the folder stores, as training loads it (a float16 folder would otherwise train in fp16)
        base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=3, dtype=torch.float32,
                                                                  ignore_mismatched_sizes=True)
    else:
        base = deberta_v3_base()
    targets = TARGETS[base.config.model_type]
    n = len(M.target_module_names(base, targets))
    uniform = 8 * n

    g = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    batches = [{"input_ids": torch.randint(5, vocab, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 3, (args.batch_size,), generator=g)} for _ in range(4)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    # GLoRA after reallocation: warm up its scores on these batches, then rebuild to its real heterogeneous ranks
    glora_after = Runner("GLoRA after realloc", method_cfg("glora", targets, budget=uniform, warmup=args.warmup + 1),
                         base, device)
    for i in range(args.warmup + 1):
        glora_after.step(batches[i % len(batches)], device, autocast)
    realloc_seconds = glora_after.hook.event["realloc_seconds"]
    ranks = sorted(glora_after.hook.event["new_ranks"].values())

    runners = [
        Runner("LoRA r=8", method_cfg("lora", targets), base, device),
        Runner("AdaLoRA init 12 -> avg 8", method_cfg("adalora", targets, init_rank=12, budget=uniform), base, device),
        Runner(f"AdaLoRA init 8 -> {min(128, uniform - 1)}",
               method_cfg("adalora", targets, init_rank=8, budget=min(128, uniform - 1)), base, device),
        Runner("GLoRA warm-up (scoring)", method_cfg("glora", targets, budget=uniform), base, device),
        Runner("GLoRA warm-up (delta_grad)", method_cfg("glora", targets, budget=uniform, score="delta_grad"), base,
               device),
        glora_after,
        Runner("bare PEFT loop (LoRA r=8)", method_cfg("lora", targets), base, device, bare=True),
    ]
    for i in range(args.warmup):
        for r in runners:
            r.step(batches[i % len(batches)], device, autocast)
    for i in range(args.steps):
        for r in runners:
            r.times.append(timed(r, batches[i % len(batches)], device, autocast))

    med = {r.name: statistics.median(r.times) for r in runners}
    lora = med["LoRA r=8"]
    print(f"device={device} batch={args.batch_size} seq_len={args.seq_len} measured_steps={args.steps} "
          f"warmup_steps={args.warmup} adapted_matrices={n} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'method':<30} {'s/step (median)':>16} {'IQR':>9} {'ratio to LoRA':>14} {'peak mem MiB':>13} " \
             f"{'trainable params':>17} {'rank budget':>12}"
    print(header)
    print("-" * len(header))
    for r in runners:
        q = statistics.quantiles(r.times, n=4) if len(r.times) >= 2 else [r.times[0]] * 3
        peak = f"{r.peak / 2**20:.0f}" if r.peak else "n/a (cpu)"
        counts = M.parameter_counts(r.model)
        budget = sum(M.current_ranks(r.model).values())
        print(f"{r.name:<30} {med[r.name]:>16.4f} {q[2] - q[0]:>9.4f} {med[r.name] / lora:>14.3f} {peak:>13} "
              f"{counts['trainable_params']:>17,} {budget:>12}")
    print(f"{'GLoRA rebuild pause (once)':<30} {realloc_seconds:>16.4f} {'':>9} {realloc_seconds / lora:>14.3f}"
          f"   (one-off, in LoRA steps)")
    print(f"GLoRA ranks after reallocation: min {ranks[0]}, median {ranks[len(ranks) // 2]}, max {ranks[-1]}")
    print(f"glora/lora step-time ratio: {med['GLoRA after realloc'] / lora:.3f}")
    print(f"glora-warmup/lora step-time ratio: {med['GLoRA warm-up (scoring)'] / lora:.3f}")
    print(f"delta_grad-warmup/lora step-time ratio: {med['GLoRA warm-up (delta_grad)'] / lora:.3f}")
    print(f"adalora/lora step-time ratio: {med['AdaLoRA init 12 -> avg 8'] / lora:.3f}")
    print(f"harness/bare step-time ratio: {lora / med['bare PEFT loop (LoRA r=8)']:.3f}")
    print(f"rebuild pause / LoRA step: {realloc_seconds / lora:.3f}")
    print(f"bench wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
