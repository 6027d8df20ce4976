"""Quantization-aware training of the small BitNet b1.58 model (CPU, one thread).

    nohup nice -n 10 python tools/train/train.py --out out/train/run > out/train/run.log 2>&1 &

Samples batches of random windows from the packed train stream (seeded), AdamW with linear warmup and cosine
decay, evaluates the held-out loss every --eval-every steps in eval mode (exact quantized forward), keeps
`best.pt` (lowest held-out loss) and `last.pt` (for --resume), and appends one JSON line per logged step to
`log.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import DocEncoder, eval_windows, load_docs, token_stream
from model import BitNetConfig, BitNetLM


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("out/train/data"))
    ap.add_argument("--tokenizer", type=Path, default=Path("out/train/tokenizer"))
    ap.add_argument("--out", type=Path, default=Path("out/train/run"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=100000, help="step cap (the schedule follows --time-budget)")
    ap.add_argument("--time-budget", type=float, default=4200.0,
                    help="seconds of training (evals excluded): the LR schedule runs on elapsed/budget")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    return ap.parse_args()


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over --warmup steps, then cosine decay to min_lr_frac * lr over progress 0..1, where
    progress = max(step / steps, train seconds / time budget): a shared CPU's speed decides the step count."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = progress
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def make_optimizer(model: BitNetLM, args: argparse.Namespace) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]  # linear weights + embedding
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norm gains
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def held_out_loss(model: BitNetLM, windows: np.ndarray, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over all windows, eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i:i + batch])
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def save_checkpoint(path: Path, model, opt, step, rng, cfg, args, best, train_s) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "train_s": train_s,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "config": cfg.to_dict(), "best": best,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, tmp)
    tmp.replace(path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    enc = DocEncoder(args.tokenizer)
    train = token_stream(enc, load_docs(args.data, "train"))  # int64[N]
    test_windows = eval_windows(token_stream(enc, load_docs(args.data, "test")), args.seq)
    vocab = enc.tok.get_vocab_size()
    cfg = BitNetConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, bos_token_id=enc.bos, eos_token_ids=(enc.eos, enc.eot),
                       dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = BitNetLM(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    opt = make_optimizer(model, args)
    rng = np.random.default_rng(args.seed)
    step, best, train_s = 0, float("inf"), 0.0
    last_path, best_path, log_path = args.out / "last.pt", args.out / "best.pt", args.out / "log.jsonl"
    if args.resume and last_path.exists():
        ck = torch.load(last_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, best, train_s = ck["step"], ck["best"], ck["train_s"]
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    elif log_path.exists():
        log_path.unlink()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train tokens {len(train)}, test windows {len(test_windows)}x{args.seq}, params {n_params}, "
          f"config {asdict(cfg)}", flush=True)
    model.train()
    t0, loss_acc, n_acc = time.time(), 0.0, 0
    progress = max(step / args.steps, train_s / args.time_budget)
    while step < args.steps and progress < 1.0:
        t_step = time.time()
        starts = rng.integers(0, len(train) - args.seq - 1, size=args.batch)
        w = torch.from_numpy(np.stack([train[s:s + args.seq + 1] for s in starts]))  # [B, seq+1]
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        train_s += time.time() - t_step
        progress = max(step / args.steps, train_s / args.time_budget)
        loss_acc, n_acc = loss_acc + loss.item(), n_acc + 1
        record = None
        if step % args.log_every == 0:
            record = {"step": step, "loss": loss_acc / n_acc, "lr": lr, "train_s": round(train_s, 1),
                      "elapsed_s": round(time.time() - t0, 1)}
            loss_acc, n_acc = 0.0, 0
        if step % args.eval_every == 0 or step == args.steps or progress >= 1.0:
            val = held_out_loss(model, test_windows, 16)
            record = (record or {"step": step, "elapsed_s": round(time.time() - t0, 1)}) | {"val_loss": val}
            if val < best:
                best = val
                save_checkpoint(best_path, model, opt, step, rng, cfg, args, best, train_s)
            save_checkpoint(last_path, model, opt, step, rng, cfg, args, best, train_s)
        if record:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print(f"done: {step} steps, {train_s:.0f}s training, {time.time() - t0:.0f}s wall, "
          f"best held-out loss {best:.4f}", flush=True)


if __name__ == "__main__":
    main()
