"""GGUF tokenizer metadata (tokenizer.ggml.*) from a Hugging Face byte-level BPE tokenizer.json.

Used by the converter. The result feeds `bitnet_py.tokenizer.Tokenizer.from_gguf_metadata`.

`tokenizer.ggml.pre` is chosen by behaviour, not by the spelling of the pre-tokenizer JSON: the HF tokenizer
(normalizer + pre-tokenizer + BPE model, no added tokens, no post-processor) and our `BPEEncoder` for each
candidate in `PRE_TOKENIZERS` encode a probe corpus, and the candidate whose ids equal HF's on every probe text
wins. (llama.cpp's convert_hf_to_gguf.py hashes the ids of one probe text against a table of known models; it
names Falcon3's hash "falcon3", which llama.cpp runs as the Llama-3 pre-tokenizer.)

Added tokens follow llama.cpp's converter (get_vocab_base): a token marked `"normalized": false` is stored as
the tokenizer's own encode -> decode round trip of its text (Falcon3's added "Ċ"-style tokens become "\\n");
special tokens, and tokens that look special (`<|...|>` and a few fixed names), are CONTROL, the rest
USER_DEFINED with "▁" replaced by a space.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from .gguf.constants import Keys, TokenType
from .tokenizer_bpe import GPT2_REGEX, LLAMA3_REGEX, PRE_TOKENIZERS, BPEEncoder, split_merge

log = logging.getLogger(__name__)

# Plain-text probes (no special tokens): contractions in mixed case, digit runs of length 1-7, punctuation
# runs, CR/LF/tab/space runs, leading/trailing spaces, accents, non-Latin scripts, emoji, code.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello World! It's a test: we'll see. They've DONE it; I'M sure he'd say 'yes'.",
    "SHE'S HERE, isn'T she? YOU'LL see, WE'VE won, they'RE late, I'D go, i'm in, We'Ve a'lL",
    "don't won't can't shouldn't y'all 'tis o'clock rock'n'roll ''' 's 'S",
    "0 1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 v2.0.1 0x1F 1e-5 -42",
    "ABC123def456 a1b2c3 x86_64 1st 2nd 3rd ９８７ ½ ⅓ Ⅻ ٣٤٥ १२३",
    "Prices: $5, €10.50, ¥300, 50% off!!! ...and more??? (really) [sure] {ok} <tag/>",
    "-----===== ***### @@@ !!!??? \"\"\" ``` ~~~ ^^^ ||| \\\\ // :: ...... ,,, ;;",
    "line one\nline two\r\nline three\n\n\nend\r\n\r\n",
    "\ttab\tseparated\t\tcolumns\t \n  two  spaces   three    four     five",
    "   leading and trailing spaces   ",
    " one leading space",
    "trailing newline\n",
    "\n", " ", "  ", "\t", "a", "?!", "\r\n",
    " \n \n\n \t\n  \n   \n    \n     \n",
    "Café naïve façade résumé Ångström Øresund Straße Ελληνικά Русский язык Ünïcödé",
    "日本語のテキストと中文文本，还有한국어 텍스트。我想在apple工作1314151天～",
    "العربية עברית हिन्दी ไทย ქართული Հայերեն ភាសាខ្មែរ",
    "Emoji: 🚀🦙 😶\u200d🌫️ 👍🏽 👨\u200d👩\u200d👧\u200d👦 ✅❤️ 🇫🇷 (normal) 🦙🦙",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x**2}  # comment\n\nif __name__ == '__main__':\n\tprint(f(42))",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++ && || != <= >= ->",
    "<html><body class=\"main\">Hi&nbsp;there</body></html> https://example.com/a?b=c&d=e#f",
    "mixedCASE camelCaseWord snake_case_word SCREAMING_CASE kebab-case-word",
    "non\u00a0breaking\u00a0space, thin\u2009space, zero\u200bwidth, ideographic\u3000space",
)

# tokenizer.ggml.pre names tried, canonical name per distinct behaviour (first of these wins as the name)
_PREFERRED_NAMES = ("llama-bpe", "gpt2", "default")
_FALCON3_NAME = re.compile(r"falcon3(?![0-9])", re.IGNORECASE)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # transformers' clean_up_tokenization


def _token_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _find_split_regex(pre_tok: dict | None) -> str | None:
    if not pre_tok:
        return None
    if pre_tok.get("type") == "Sequence":
        for p in pre_tok.get("pretokenizers", []):
            r = _find_split_regex(p)
            if r is not None:
                return r
        return None
    if pre_tok.get("type") == "Split":
        return (pre_tok.get("pattern") or {}).get("Regex")
    return None


def _pre_tokenizer_types(pre_tok: dict | None) -> str:
    """'Sequence[Split, ByteLevel]'-style summary of a pre_tokenizer JSON, for error messages."""
    if not pre_tok:
        return "none"
    if pre_tok.get("type") == "Sequence":
        return f"Sequence[{', '.join(_pre_tokenizer_types(p) for p in pre_tok.get('pretokenizers', []))}]"
    return str(pre_tok.get("type"))


def _is_gpt2_bytelevel(pre_tok: dict | None) -> bool:
    return bool(pre_tok) and pre_tok.get("type") == "ByteLevel" and pre_tok.get("use_regex", True)


def _candidates(pre_tok: dict | None) -> list[str]:
    """One name per distinct PRE_TOKENIZERS behaviour; the one the JSON's regex suggests first."""
    by_behaviour: dict = {}
    for name in (*_PREFERRED_NAMES, *PRE_TOKENIZERS):
        if name in PRE_TOKENIZERS:
            by_behaviour.setdefault(PRE_TOKENIZERS[name], name)
    names = list(by_behaviour.values())
    regex = _find_split_regex(pre_tok)
    hint = ("llama-bpe" if regex == LLAMA3_REGEX else
            "gpt2" if regex == GPT2_REGEX or (regex is None and _is_gpt2_bytelevel(pre_tok)) else None)
    if hint in names:
        names.remove(hint)
        names.insert(0, hint)
    return names


def _hf_plain_ids(hf: HFTokenizer, text: str) -> list[int]:
    """HF's ids for `text` through normalizer, pre-tokenizer and model only: added tokens are not matched
    (that is the tokenizer's job, not the pre-tokenizer's) and no post-processor tokens are added."""
    if hf.normalizer is not None:
        text = hf.normalizer.normalize_str(text)
    pieces = hf.pre_tokenizer.pre_tokenize_str(text) if hf.pre_tokenizer is not None else [(text, None)]
    return [tok.id for piece, _ in pieces for tok in hf.model.tokenize(piece)]


def _says_falcon3(*configs: dict) -> bool:
    for cfg in configs:
        for key in ("_name_or_path", "name_or_path"):
            value = cfg.get(key)
            if isinstance(value, str) and _FALCON3_NAME.search(value):
                return True
    return False


def _short(ids: list[int], n: int = 16) -> str:
    return str(ids[:n])[:-1] + (", ...]" if len(ids) > n else "]")


def detect_pre_tokenizer(tj_path: Path, tj: dict, hf: HFTokenizer, model_tokens: list[str],
                         merges: list[str]) -> str:
    """The tokenizer.ggml.pre whose BPEEncoder gives HF's ids on every PROBE_TEXTS entry (ValueError if none)."""
    pre_tok = tj.get("pre_tokenizer")
    reference = [_hf_plain_ids(hf, t) for t in PROBE_TEXTS]
    mismatches = []
    for name in _candidates(pre_tok):
        encoder = BPEEncoder(model_tokens, merges, name)
        for text, want in zip(PROBE_TEXTS, reference):
            got = encoder.encode(text)
            if got != want:
                mismatches.append(f"{name}: first differs on {text!r} (HF {_short(want)}, ours {_short(got)})")
                break
        else:
            if tj.get("normalizer") is not None:
                log.warning("%s: normalizer %s is not reproduced (llama.cpp ignores it too)", tj_path,
                            (tj["normalizer"] or {}).get("type"))
            return name
    raise ValueError(
        f"{tj_path}: unrecognized pre-tokenizer {_pre_tokenizer_types(pre_tok)} "
        f"(Split regex {_find_split_regex(pre_tok)!r}): no supported tokenizer.ggml.pre reproduces its token ids; "
        + "; ".join(mismatches))


def _round_trip(hf: HFTokenizer, text: str, cleanup: bool) -> str:
    """transformers' tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)), as llama.cpp's
    converter computes it for non-normalized added tokens."""
    out = hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
    if cleanup:
        for old, new in _CLEANUP:
            out = out.replace(old, new)
    return out


def looks_special(text: str) -> bool:
    """llama.cpp converter's does_token_look_special: added tokens that are CONTROL though not marked special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def metadata_from_hf_tokenizer(hf_dir) -> dict:
    """GGUF tokenizer metadata (Keys.* -> value) from a HF byte-level BPE tokenizer.json +
    tokenizer_config.json (+ config.json, read for the model's name only)."""
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.exists():
        raise ValueError(f"{tj_path} not found (only byte-level BPE tokenizer.json files are supported)")
    tj = _read_json(tj_path)
    cfg = _read_json(hf_dir / "tokenizer_config.json")
    model_cfg = _read_json(hf_dir / "config.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tj_path}: only byte-level BPE models are supported (got {model.get('type')!r})")
    try:
        hf = HFTokenizer.from_file(str(tj_path))
    except Exception as e:  # the tokenizers library reports malformed files with its own exception type
        raise ValueError(f"{tj_path}: the tokenizers library cannot load it ({e})") from None

    added_tokens = tj.get("added_tokens") or []
    vocab_text: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    n = max([*vocab_text, *(int(a["id"]) for a in added_tokens)]) + 1
    model_tokens = [vocab_text.get(i, f"[PAD{i}]") for i in range(n)]
    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            split_merge(m)
            merges.append(m)
        else:
            merges.append(f"{m[0]} {m[1]}")

    pre = detect_pre_tokenizer(tj_path, tj, hf, model_tokens, merges)
    if PRE_TOKENIZERS[pre] == PRE_TOKENIZERS["falcon3"] and _says_falcon3(cfg, model_cfg):
        pre = "falcon3"

    tokens = list(model_tokens)
    types: dict[int, int] = {i: int(TokenType.NORMAL) for i in vocab_text}
    content_to_id: dict[str, int] = {}
    cleanup = cfg.get("clean_up_tokenization_spaces") is True
    for added in added_tokens:
        i, text = int(added["id"]), added["content"]
        content_to_id[text] = i
        if not added.get("normalized", not added.get("special", False)):
            decoded = _round_trip(hf, text, cleanup)
            if decoded != text:
                log.info("added token %d %r is stored as %r (its encode -> decode round trip)", i, text, decoded)
                text = decoded
        if added.get("special") or looks_special(text):
            types[i] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(TokenType.USER_DEFINED)
        tokens[i] = text
    token_type = np.array([types.get(i, int(TokenType.UNUSED)) for i in range(n)], dtype=np.int32)

    text_to_id = {t: i for i, t in enumerate(tokens)}

    def lookup(text: str | None) -> int | None:
        if text is None:
            return None
        return text_to_id.get(text, content_to_id.get(text))

    bos = lookup(_token_text(cfg.get("bos_token")))
    eos = lookup(_token_text(cfg.get("eos_token")))
    eot = None
    end_of_text = lookup("<|end_of_text|>")
    if eos is not None and tokens[eos] == "<|eot_id|>" and end_of_text is not None:
        eos, eot = end_of_text, eos  # Llama-3 convention: EOS = end of text, EOT = end of turn
    elif lookup("<|eot_id|>") is not None:
        eot = lookup("<|eot_id|>")

    meta: dict = {
        Keys.TOKENIZER_MODEL: "gpt2",
        Keys.TOKENIZER_PRE: pre,
        Keys.TOKENS: tokens,
        Keys.TOKEN_TYPE: token_type,
        Keys.MERGES: merges,
        Keys.ADD_BOS: bool(cfg.get("add_bos_token", bos is not None)),
        Keys.ADD_EOS: bool(cfg.get("add_eos_token", False)),
    }
    for key, value in ((Keys.BOS_ID, bos), (Keys.EOS_ID, eos), (Keys.EOT_ID, eot),
                       (Keys.UNK_ID, lookup(_token_text(cfg.get("unk_token")))),
                       (Keys.PAD_ID, lookup(_token_text(cfg.get("pad_token"))))):
        if value is not None:
            meta[key] = int(value)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = hf_dir / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    if template:
        meta[Keys.CHAT_TEMPLATE] = template
    return meta
