"""`python -m bitnet_py generate`: text generation from the command line, like bitnet.cpp's run_inference.py.

    python -m bitnet_py generate -m MODEL -p PROMPT -n 128 -t THREADS [-c CTX] [--temp T] [--seed S] [-cnv]

Prints the generated text, then one timing line (load ms, prompt eval tok/s, generation tok/s) on stderr.
With -cnv the prompt is the system message of an interactive chat read from stdin.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .huge_pages import KEEP_FILE_MAP_HELP, NO_MMAP_HELP
from .sampling import NO_SCREEN_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitnet_py generate", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="GGUF path or org/repo[:file.gguf] (default: bundled model)")
    p.add_argument("-p", "--prompt", default="", help="prompt text (system prompt with -cnv)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size in tokens")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-cnv", "--conversation", action="store_true", help="interactive chat with the chat template")
    p.add_argument("--tl2-config", default=None, help="bitnet.cpp kernel_config.ini for TL2 files")
    p.add_argument("--cache-type", choices=("f16", "f32"), default="f16", help="KV cache precision")
    p.add_argument("--head-type", choices=("f16", "int8"), default="f16", help="int8: approximate, faster head")
    p.add_argument("--no-mmap", action="store_true",
                   help=NO_MMAP_HELP)
    p.add_argument("--keep-file-map", action="store_true",
                   help=KEEP_FILE_MAP_HELP + " (chat sessions only: a one-shot run always reads the file map)")
    p.add_argument("--no-screen-head", action="store_true", help=NO_SCREEN_HELP)
    return p


def promotes(args: argparse.Namespace) -> bool:
    """Whether to move the weights into huge pages in the background (bitnet_py.promotion): for chat sessions. A
    one-shot run ends within seconds, while the copy runs beside it (a 32-token run here: 18.6-19.7 tok/s with
    it, 23.0-23.3 without), before it pays back."""
    return args.conversation and not args.keep_file_map


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_predict < 0 or args.ctx_size <= 0 or (args.threads is not None and args.threads <= 0):
        return _error("-n must be >= 0, -c and -t must be > 0")
    try:
        from .sampling import SamplingParams, head_request, make_rng, sample_token
        params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        return _error(str(e))
    import numba

    from .generate import Sequence1
    from .gguf.reader import GGUFError
    from .hub import ModelResolveError, resolve_model
    from .model import Model
    if args.threads:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        path = resolve_model(args.model)
        model = Model.load(path, tl2_config=args.tl2_config, cache_type=args.cache_type, head_type=args.head_type,
                           no_mmap=args.no_mmap, screen_head=not args.no_screen_head,
                           promote=promotes(args))
        tok = model.tokenizer
    except (GGUFError, ModelResolveError, ValueError, OSError) as e:
        return _error(str(e))
    n_ctx = min(args.ctx_size, model.max_positions)
    rng = make_rng(args.seed)

    def run(seq: Sequence1, ids: list[int], history: list[int]) -> tuple[str, float, int, float]:
        from .detokenizer import IncrementalDetokenizer
        t0 = time.perf_counter()
        history.extend(ids)
        logits = seq.feed(ids, head=head_request(params, np.asarray(history, np.int32)))
        prompt_s = time.perf_counter() - t0
        detok = IncrementalDetokenizer(tok, skip_special=True)
        out, n_gen, t1 = [], 0, time.perf_counter()
        for _ in range(args.n_predict):
            token, _ = sample_token(logits, params, rng, np.asarray(history, np.int32))
            n_gen += 1
            history.append(token)
            if token in tok.stop_ids:
                break
            piece = detok.push(token)
            out.append(piece)
            print(piece, end="", flush=True)
            if seq.n_past >= n_ctx:
                break
            logits = seq.feed([token], head=head_request(params, np.asarray(history, np.int32)))
        tail = detok.flush()
        print(tail, flush=True)
        return "".join(out) + tail, prompt_s, n_gen, time.perf_counter() - t1

    def timing(n_prompt: int, prompt_s: float, n_gen: int, gen_s: float) -> None:
        print(f"[load {model.load_ms:.0f} ms | prompt {n_prompt} tok, {n_prompt / max(prompt_s, 1e-9):.1f} tok/s"
              f" | generation {n_gen} tok, {n_gen / max(gen_s, 1e-9):.1f} tok/s]", file=sys.stderr)

    try:
        seq = Sequence1(model, n_ctx)
        if not args.conversation:
            ids = tok.encode(args.prompt)
            if len(ids) + args.n_predict > n_ctx:
                return _error(f"prompt ({len(ids)} tokens) + -n {args.n_predict} exceeds the context ({n_ctx})")
            _, ps, ng, gs = run(seq, ids, [])
            timing(len(ids), ps, ng, gs)
            return 0
        messages = [{"role": "system", "content": args.prompt}] if args.prompt else []
        history: list[int] = []
        while True:
            try:
                user = input("> ")
            except EOFError:
                return 0
            messages.append({"role": "user", "content": user})
            text = model.chat_template.render(messages, add_generation_prompt=True)
            ids = tok.encode(text, parse_special=True)
            new = ids[seq.n_past:] if ids[:seq.n_past] == history[:seq.n_past] else None
            if new is None:  # the rendering changed earlier text: start over
                seq, history = Sequence1(model, n_ctx), []
                new = ids
            if seq.n_past + len(new) + args.n_predict > n_ctx:
                return _error("context full; start a new conversation")
            reply, ps, ng, gs = run(seq, new, history)
            messages.append({"role": "assistant", "content": reply})
            timing(len(new), ps, ng, gs)
    except ValueError as e:
        return _error(str(e))


if __name__ == "__main__":
    sys.exit(main())
