"""Build the training corpus from Debian's `fortunes` + `fortunes-min` packages (English fortune cookies).

    apt-get update && apt-get install -y fortunes fortunes-min     # Debian 12: version 1:1.99.1-7.3
    python tools/train/prepare_data.py --out out/train/data

Reads every fortune file under /usr/share/games/fortunes (the `%`-separated text files, not `.dat`/`.u8`),
skips `ascii-art` (drawings) and `translate-me` (non-English), normalizes line ends and trailing spaces,
drops exact duplicates, shuffles with a fixed seed and holds out 5% as the test split. Each training fortune
becomes one document, either plain text or (for ~25% of them) a one-turn chat in the 2B-4T template, so that the
bundled model also answers `/v1/chat/completions`: `User: <request><|eot_id|>Assistant: <fortune><|eot_id|>`.
The request is the fortune's question for `Q: ... A: ...` fortunes, else a request for that file's topic.

Writes `train.json` and `test.json` (lists of documents: {"kind": "text"|"chat", "text" or "user"/"assistant",
"source"}) and `manifest.json` (counts, sha256 of each file, package versions).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
SKIP_FILES = {"ascii-art", "translate-me"}
SEED = 20240611
TEST_FRACTION = 0.05
CHAT_FRACTION = 0.25
TOPICS = {  # fortune file -> what a user would ask for
    "computers": "computers", "linux": "Linux", "linuxcookie": "Linux", "debian": "Debian", "perl": "Perl",
    "education": "school", "food": "food", "law": "the law", "love": "love", "medicine": "doctors",
    "men-women": "men and women", "politics": "politics", "science": "science", "sports": "sports",
    "work": "work", "pets": "pets", "kids": "kids", "art": "art", "literature": "books", "drugs": "drugs",
    "magic": "magic", "news": "the news", "people": "people", "startrek": "Star Trek", "tao": "the Tao",
    "wisdom": "wisdom", "songs-poems": "poetry", "riddles": "riddles", "definitions": "words",
}
TOPIC_REQUESTS = ["Tell me something about {}.", "Say something about {}.", "What do you think about {}?"]
GENERIC_REQUESTS = ["Tell me a fortune.", "Say something wise.", "Tell me something funny.",
                    "Give me a fortune cookie.", "Tell me a joke.", "Say something."]
QA_RE = re.compile(r"^Q:\s*(?P<q>.+?)\n\s*A:\s*(?P<a>.+)$", re.S)


def read_fortunes(directory: Path) -> list[tuple[str, str]]:
    """All (source file, fortune text) pairs, files in sorted order."""
    pairs = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in SKIP_FILES or not path.is_file():
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        for chunk in re.split(r"^%\s*$", raw, flags=re.M):
            text = "\n".join(line.rstrip() for line in chunk.strip("\n").split("\n")).strip()
            if text:
                pairs.append((path.name, text))
    return pairs


def dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for source, text in pairs:
        if text not in seen:
            seen.add(text)
            out.append((source, text))
    return out


def as_chat(source: str, text: str, rng: random.Random) -> dict | None:
    m = QA_RE.match(text)
    if m:
        q, a = " ".join(m["q"].split()), m["a"].strip()
        return {"kind": "chat", "user": q, "assistant": a, "source": source}
    if source in TOPICS and rng.random() < 0.6:
        request = rng.choice(TOPIC_REQUESTS).format(TOPICS[source])
    else:
        request = rng.choice(GENERIC_REQUESTS)
    return {"kind": "chat", "user": request, "assistant": text, "source": source}


def build(directory: Path) -> tuple[list[dict], list[dict]]:
    pairs = dedupe(read_fortunes(directory))
    rng = random.Random(SEED)
    rng.shuffle(pairs)
    n_test = int(len(pairs) * TEST_FRACTION)
    test = [{"kind": "text", "text": t, "source": s} for s, t in pairs[:n_test]]
    train = []
    for source, text in pairs[n_test:]:
        if rng.random() < CHAT_FRACTION:
            train.append(as_chat(source, text, rng))
        else:
            train.append({"kind": "text", "text": text, "source": source})
    return train, test


def package_version(name: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fortunes", type=Path, default=FORTUNE_DIR)
    ap.add_argument("--out", type=Path, default=Path("out/train/data"))
    args = ap.parse_args()
    if not args.fortunes.is_dir():
        raise SystemExit(f"{args.fortunes} not found: apt-get install -y fortunes fortunes-min")
    train, test = build(args.fortunes)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": SEED, "test_fraction": TEST_FRACTION, "chat_fraction": CHAT_FRACTION,
                "packages": {p: package_version(p) for p in ("fortunes", "fortunes-min")},
                "n_train": len(train), "n_test": len(test),
                "n_train_chat": sum(d["kind"] == "chat" for d in train), "sha256": {}}
    for name, docs in (("train.json", train), ("test.json", test)):
        data = json.dumps(docs, ensure_ascii=False, indent=0).encode()
        (args.out / name).write_bytes(data)
        manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
