"""`pytest --parity --llama-server PATH | --parity-url URL [--parity-model GGUF ...]`: a live llama-server
(bitnet.cpp's or upstream's) vs our engine on the same GGUF. Deselected without --parity. Tolerances: compare.py
and docs/parity.md."""
from __future__ import annotations

import pytest

from . import report
from .checks import check_chat, check_completion, check_tokenization
from .prompts import MULTI_TURN, completion_prompts

pytestmark = pytest.mark.parity

PROMPTS = completion_prompts() + [(f"chat{i}", None) for i in range(len(MULTI_TURN))]
N_PREDICT = 32


def _prompt_text(case, prompt_id: str, text: str | None) -> str:
    """Fixture/long prompts as they are; chat ones as our chat template renders them."""
    if text is not None:
        return text
    return case.model.chat_template.render(list(MULTI_TURN[int(prompt_id[4:])]))


def test_tokenization(parity_case):
    texts = [_prompt_text(parity_case, pid, t) for pid, t in PROMPTS]
    assert check_tokenization(parity_case.peer, parity_case.model, texts) == len(PROMPTS)


@pytest.mark.parametrize("prompt_id,text", PROMPTS, ids=[p for p, _ in PROMPTS])
def test_greedy_and_top_probs(parity_case, prompt_id, text):
    case = parity_case
    rep = check_completion(case.peer, case.model, _prompt_text(case, prompt_id, text), N_PREDICT,
                           ubatch=case.spec.ubatch)
    tie = f"near-tie at step {rep.near_tie_at}" if rep.near_tie_at is not None else "no near-tie"
    report.add(f"{case.spec.name:18s} {prompt_id:9s} prompt {rep.prompt_tokens:4d} tok | greedy equal "
               f"{rep.greedy_compared:2d}/{rep.steps} steps ({tie}) | top-5 max |dp| {rep.topk_max_abs:.2e} | "
               f"prefill tok/s ours {rep.ours_rates[0]:8.1f} peer {rep.peer_rates[0]:8.1f} | "
               f"decode tok/s ours {rep.ours_rates[1]:7.1f} peer {rep.peer_rates[1]:7.1f}")


@pytest.mark.parametrize("i", range(len(MULTI_TURN)), ids=[f"chat{i}" for i in range(len(MULTI_TURN))])
def test_chat_completion_text(parity_case, i):
    case = parity_case
    rep = check_chat(case.peer, case.model, list(MULTI_TURN[i]), N_PREDICT, ubatch=case.spec.ubatch)
    report.add(f"{case.spec.name:18s} chat{i}     /v1/chat/completions text "
               f"{'identical' if rep.equal else 'differs after a near-tie: ' + rep.note}")
