"""AdamW for the components GLoRA's rebuild adds: their update against a fresh torch AdamW parameter's, after a late
rebuild, with and without the fresh-component correction (model.AddedComponentsAdamW).

A tiny DeBERTa-v2 (random init, random tokens) trains as GLoRA with the project's own hook and optimizer; the
reallocation comes after --rebuild-at optimizer steps. From then on, every step, each added slice's update is divided
by the update a `torch.optim.AdamW` parameter created at the rebuild gets from the same gradients, starting from the
same values: 1.000 means exact. Both runs see the same batches; they differ only in the correction.

    uv run python bench/fresh_adamw.py                      # rebuild after 1,200 steps, 200 steps measured
    uv run python bench/fresh_adamw.py --rebuild-at 50      # the demo's reallocation step
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src import model as M  # noqa: E402
from src import train as T  # noqa: E402

REPORT_AT = (1, 2, 5, 10, 20, 50, 100, 200)


def tiny_deberta(seed: int):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=256, max_position_embeddings=128, relative_attention=True,
                             position_buckets=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                             share_att_key=True, position_biased_input=False, type_vocab_size=0, num_labels=2)
    return DebertaV2ForSequenceClassification(config)


def batch(step: int, size: int = 16, length: int = 24) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 500, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] % 2)}


def run(exact: bool, rebuild_at: int, after: int, seed: int) -> dict[int, float]:
    targets = OmegaConf.load(REPO / "config" / "config.yaml").model.peft.target_modules
    cfg = OmegaConf.create({
        "seed": seed, "model": {"backbone": "bench", "peft": {
            "type": "lora", "init_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
            "target_modules": targets, "modules_to_save": ["classifier", "pooler"]}},
        "glo_ra": {"total_rank_budget": "uniform", "budget_unit": "rank", "beta_ema": 0.9,
                   "warmup_steps": rebuild_at, "score": "grad_norm", "min_rank": 1, "max_rank": None}})
    model = M.build_adapter(cfg, tiny_deberta(seed), total_steps=rebuild_at + after)
    model.train()
    train = OmegaConf.create({"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01,
                              "adam_betas": [0.9, 0.999], "adam_eps": 1e-8})
    optimizer = T.build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (rebuild_at + after + 1))
    hook = M.make_hook(cfg, model, optimizer)
    hook.exact_added = exact  # False: the behaviour before the correction
    for step in range(1, rebuild_at + 1):
        T.forward_backward(model, batch(step), torch.device("cpu"), T.nullcontext)
        T.optimizer_step(model, optimizer, scheduler, hook, step, 1.0)
    event = hook.event
    added = {}  # (layer, part) -> (parameter, dim, first added index)
    for name, layer in M.lora_layers(model).items():
        kept = min(event["old_ranks"][name], event["new_ranks"][name])
        if event["new_ranks"][name] > kept:
            added[name, "A"] = (layer.lora_A[M.ADAPTER].weight, 0, kept)
            added[name, "B"] = (layer.lora_B[M.ADAPTER].weight, 1, kept)

    def view(p, d, k):
        return p.detach().narrow(d, k, p.shape[d] - k)

    fresh = {key: torch.nn.Parameter(view(*v).clone()) for key, v in added.items()}
    group = next(g for g in optimizer.param_groups if any(p is added[next(iter(added))][0] for p in g["params"]))
    reference = torch.optim.AdamW(list(fresh.values()), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                  weight_decay=group["weight_decay"])
    ratios = {}
    for k in range(1, after + 1):
        step = rebuild_at + k
        T.forward_backward(model, batch(step), torch.device("cpu"), T.nullcontext)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = {key: view(*v).clone() for key, v in added.items()}
        for key, (p, d, i) in added.items():
            fresh[key].grad = p.grad.narrow(d, i, p.shape[d] - i).clone()
            fresh[key].data.copy_(before[key])
        reference.param_groups[0]["lr"] = group["lr"]
        T.optimizer_step(model, optimizer, scheduler, hook, step, 0.0)  # clipped above, as the reference's grads
        reference.step()
        num = sum((view(*added[key]) - before[key]).square().sum().item() for key in added)
        den = sum((fresh[key].detach() - before[key]).square().sum().item() for key in added)
        ratios[k] = math.sqrt(num / den)
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild-at", type=int, default=1200, help="optimizer steps before the reallocation")
    ap.add_argument("--after", type=int, default=200, help="steps measured after it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    old = run(False, args.rebuild_at, args.after, args.seed)
    new = run(True, args.rebuild_at, args.after, args.seed)
    print(f"tiny DeBERTa-v2, GLoRA reallocation after {args.rebuild_at} AdamW steps (betas 0.9/0.999, lr 1e-3 "
          f"linear decay, weight decay 0.01, clip 1.0); update of the added components / update of a fresh AdamW "
          f"parameter fed the same gradients")
    print(f"{'step after rebuild':>18} {'without correction':>19} {'with correction':>16}")
    for k in (k for k in REPORT_AT if k <= args.after):
        print(f"{k:>18} {old[k]:>19.3f} {new[k]:>16.4f}")
    worst = max(abs(r - 1) for r in new.values())
    print(f"with correction: max |ratio - 1| over all {args.after} steps = {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
