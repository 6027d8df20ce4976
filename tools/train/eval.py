"""Measure the exported model and record training-framework reference outputs for the engine's parity test.

    python tools/train/eval.py --hf out/train/hf --data out/train/data \
        --ref bitnet_py/data/bitnet-tiny-trained-ref.json --report out/train/eval.json

1. Held-out perplexity (test split, non-overlapping 256-token windows, eval mode = exact ternary weights and
   int8 activations) of: the exported model (its bf16 weights widened to float32, exactly what the GGUF gets);
   a unigram model (train-split token counts, add-one smoothed); the same architecture with random weights.
   Also bits per UTF-8 byte of the test text (tokenizer-independent).
2. Reference outputs on fixed prompts with the torch forward of model.py in eval mode (no KV cache: each step
   recomputes the whole sequence): prompt ids, 32 greedy ids (first maximum in id order) with per-step margin and
   top-5, and the full last-prompt logits. Floats are the shortest decimal that round-trips the float32 value.
3. A few sampled generations (temperature 0.8, top-k 40, seeded) for the docs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import DocEncoder, chat_prompt, eval_windows, load_docs, token_stream
from export import load_hf
from model import BitNetLM
from train import held_out_loss

N_PREDICT = 32
REF_PROMPTS = ["The secret of success is", "A computer is", "", chat_prompt("Tell me a joke."),
               "Q: What is the difference between a duck?\nA:"]
SAMPLE_PROMPTS = ["The meaning of life is", "Never trust a", "A programmer", chat_prompt("Tell me a fortune."),
                  chat_prompt("What do you think about computers?")]


def f32(x: float) -> float:
    """Shortest decimal that round-trips the float32 value, as a Python float."""
    return float(str(np.float32(x)))


def perplexities(model: BitNetLM, enc: DocEncoder, data_dir: Path, seq: int, seed: int) -> dict:
    train_ids = token_stream(enc, load_docs(data_dir, "train"))
    test_docs = load_docs(data_dir, "test")
    test_ids = token_stream(enc, test_docs)
    windows = eval_windows(test_ids, seq)  # [W, seq+1]
    targets = windows[:, 1:].reshape(-1)
    n_bytes_per_token = sum(len(d["text"].encode()) for d in test_docs) / len(test_ids)
    vocab = model.cfg.vocab_size
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    unigram = float(-np.log(counts[targets] / counts.sum()).mean())
    trained = held_out_loss(model, windows, 16)
    rand = BitNetLM(model.cfg)
    rand.init_weights(torch.Generator().manual_seed(seed))
    random_loss = held_out_loss(rand, windows, 16)
    out = {"test_tokens_scored": int(targets.size), "test_bytes_per_token": n_bytes_per_token}
    for name, nats in (("trained", trained), ("unigram", unigram), ("random_init", random_loss)):
        out[name] = {"loss_nats": nats, "perplexity": math.exp(nats),
                     "bits_per_byte": nats / math.log(2) / n_bytes_per_token}
    return out


@torch.no_grad()
def greedy_reference(model: BitNetLM, prompt_ids: list[int], n_predict: int) -> dict:
    ids = list(prompt_ids)
    steps, last_logits = [], None
    for i in range(n_predict):
        logits = model(torch.tensor([ids]))[0, -1].numpy()  # f32[V]
        if i == 0:
            last_logits = logits.copy()
        order = np.argsort(-logits, kind="stable")[:5]  # stable: ties keep id order
        tok = int(np.argmax(logits))
        p = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
        steps.append({"id": tok, "logit": f32(logits[tok]), "margin": f32(logits[order[0]] - logits[order[1]]),
                      "top5": [{"id": int(j), "logit": f32(logits[j]), "p": f32(p[j])} for j in order]})
        ids.append(tok)
    return {"gen_ids": ids[len(prompt_ids):], "steps": steps,
            "last_prompt_logits": [f32(v) for v in last_logits]}


@torch.no_grad()
def sample(model: BitNetLM, enc: DocEncoder, prompt: str, n: int, gen: torch.Generator) -> str:
    ids = enc.encode_prompt(prompt)
    start = len(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids[-256:]]))[0, -1] / 0.8
        top = torch.topk(logits, 40)
        tok = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)])
        if tok in (enc.eos, enc.eot):
            break
        ids.append(tok)
    return enc.tok.decode(ids[start:], skip_special_tokens=False)


def engine_check(gguf: Path, ref: dict) -> list[dict]:
    """Run our engine on the converted GGUF: record its greedy ids (for the stability test) and how far its
    logits are from the torch references (for the docs)."""
    from bitnet_py.generate import generate
    from bitnet_py.model import Model
    engine = Model.load(str(gguf))
    out = []
    for r in ref["results"]:
        res = generate(engine, r["prompt_ids"], ref["n_predict"], keep_logits=True)
        r["engine_gen_ids"] = res.ids
        first_diff = next((i for i, (a, b) in enumerate(zip(res.ids, r["gen_ids"])) if a != b), None)
        out.append({"prompt": r["prompt"], "last_logits_max_abs_diff": float(np.abs(
            res.step_logits[0] - np.asarray(r["last_prompt_logits"], np.float32)).max()),
            "greedy_equal": res.ids == r["gen_ids"], "first_differing_step": first_diff,
            "ref_margin_there": None if first_diff is None else r["steps"][first_diff]["margin"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", type=Path, default=Path("out/train/hf"))
    ap.add_argument("--data", type=Path, default=Path("out/train/data"))
    ap.add_argument("--ref", type=Path, default=Path("bitnet_py/data/bitnet-tiny-trained-ref.json"))
    ap.add_argument("--gguf", type=Path, help="converted GGUF: record its sha256 and the engine's greedy ids")
    ap.add_argument("--report", type=Path, default=Path("out/train/eval.json"))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234, help="random-init baseline and sampling seed")
    ap.add_argument("--no-perplexity", action="store_true", help="skip part 1 (quick pipeline checks)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_hf(args.hf)
    enc = DocEncoder(args.hf)
    report = {}
    if not args.no_perplexity:
        report["perplexity"] = perplexities(model, enc, args.data, args.seq, args.seed)
        print(json.dumps(report, indent=1), flush=True)

    results = []
    for prompt in REF_PROMPTS:
        pids = enc.encode_prompt(prompt)
        r = {"prompt": prompt, "prompt_ids": pids} | greedy_reference(model, pids, N_PREDICT)
        r["gen_text"] = enc.tok.decode(r["gen_ids"], skip_special_tokens=False)
        results.append(r)
        print(repr(prompt), "->", repr(r["gen_text"]), "min margin", min(s["margin"] for s in r["steps"]))
    sha = hashlib.sha256((args.hf / "model.safetensors").read_bytes()).hexdigest()
    ref = {"model_file": "model.safetensors (exported HF folder; bf16 latent weights)", "model_sha256": sha,
           "n_vocab": model.cfg.vocab_size, "n_predict": N_PREDICT,
           "reference": "tools/train/model.py BitNetLM, torch " + torch.__version__ + ", float32, eval mode "
                        "(ternary absmean weights, int8 absmax per-token activations), eager attention, no KV "
                        "cache (each step recomputes the sequence), 1 thread; greedy = first maximum in id order",
           "results": results}
    if args.gguf:
        ref["gguf_file"] = args.gguf.name
        ref["gguf_sha256"] = hashlib.sha256(args.gguf.read_bytes()).hexdigest()
        report["engine_vs_torch"] = engine_check(args.gguf, ref)
        print(json.dumps(report["engine_vs_torch"], indent=1))
    args.ref.parent.mkdir(parents=True, exist_ok=True)
    args.ref.write_text(json.dumps(ref, separators=(",", ":")) + "\n")

    gen = torch.Generator().manual_seed(args.seed)
    report["samples"] = [{"prompt": p, "completion": sample(model, enc, p, 60, gen)} for p in SAMPLE_PROMPTS]
    report["greedy"] = [{"prompt": r["prompt"], "completion": r["gen_text"]} for r in results]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    for s in report["samples"]:
        print(json.dumps(s, ensure_ascii=False))


if __name__ == "__main__":
    main()
