"""Plot the training log (log.jsonl from train.py) as docs/loss_curve.png.

    python tools/train/plot_loss.py --log out/train/run/log.jsonl --report out/train/eval.json -o docs/loss_curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", type=Path, default=Path("out/train/run/log.jsonl"))
    ap.add_argument("--report", type=Path, default=Path("out/train/eval.json"),
                    help="eval.py report: draws the unigram baseline if present")
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/loss_curve.png"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*train), label="train loss (mean of 10 steps, dropout on)", color="tab:blue", lw=1.2)
    ax.plot(*zip(*val), "o-", label="held-out loss (eval mode)", color="tab:orange", lw=1.5)
    if args.report.exists():
        ppl = json.loads(args.report.read_text()).get("perplexity", {})
        if "unigram" in ppl:
            ax.axhline(ppl["unigram"]["loss_nats"], ls="--", color="gray", lw=1, label="unigram baseline (held-out)")
    ax.set_xlabel("step (8 x 256 tokens)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("bitnet-tiny-trained: BitNet b1.58 QAT on Debian fortunes")
    ax.set_ylim(bottom=max(0.0, min(v for _, v in train + val) - 0.3), top=min(8.5, max(v for _, v in train) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"{len(train)} train points, {len(val)} held-out points -> {args.out}")


if __name__ == "__main__":
    main()
