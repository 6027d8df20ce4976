"""Train the byte-level BPE tokenizer (GPT-2 byte map, Llama-3 pre-tokenizer regex, ignore_merges) on train.json.

    python tools/train/train_tokenizer.py --data out/train/data --out out/train/tokenizer --vocab 4096

Regular vocabulary = 256 byte symbols + merges, `vocab - 3` tokens in all; then the three specials, after the
regular vocabulary as in Llama 3 / BitNet 2B-4T: <|begin_of_text|> (BOS, added by the post-processor),
<|end_of_text|> (EOS), <|eot_id|> (end of a chat turn). Writes tokenizer.json, tokenizer_config.json (with the
2B-4T chat template) and special_tokens_map.json, laid out like the tiny-bitnet-b158 fixture.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama-3 pre-tokenizer split pattern (same text as the tiny-llama fixture's tokenizer.json; GGUF pre "llama-bpe").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, EOT]
# BitNet b1.58 2B-4T chat template: "Role: content<|eot_id|>" per message, then "Assistant: ".
CHAT_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                 "message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{{ content }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
MAX_LEN = 2048


def doc_texts(docs: list[dict]) -> list[str]:
    out = []
    for d in docs:
        out.extend([d["text"]] if d["kind"] == "text" else [f"User: {d['user']}", f"Assistant: {d['assistant']}"])
    return out


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    n_regular = vocab_size - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != n_regular:
        raise SystemExit(f"trainer produced {tok.get_vocab_size()} regular tokens, wanted {n_regular}")
    tok.add_special_tokens(SPECIALS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": MAX_LEN,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOT}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("out/train/data"))
    ap.add_argument("--out", type=Path, default=Path("out/train/tokenizer"))
    ap.add_argument("--vocab", type=int, default=4096, help="total vocabulary including the 3 specials")
    args = ap.parse_args()
    texts = doc_texts(json.loads((args.data / "train.json").read_text()))
    tok = build_tokenizer(texts, args.vocab)
    save(tok, args.out)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    print(f"vocab {tok.get_vocab_size()} specials {ids} -> {args.out}")


if __name__ == "__main__":
    main()
