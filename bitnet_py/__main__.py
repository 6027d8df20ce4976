"""`python -m bitnet_py COMMAND ...`: generate | serve | convert | dummy | bench."""
from __future__ import annotations

import sys

COMMANDS = {
    "generate": ("bitnet_py.cli_generate", "generate text from a prompt (like bitnet.cpp's run_inference.py)"),
    "serve": ("bitnet_py.server_cli", "start the OpenAI-compatible HTTP server"),
    "convert": ("bitnet_py.convert", "convert a Hugging Face checkpoint to GGUF"),
    "dummy": ("bitnet_py.dummy", "write a random-weight model at a real layout"),
    "bench": ("bitnet_py.bench", "measure prefill/decode speed (like llama-bench)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: python -m bitnet_py COMMAND [ARGS]\n\ncommands:", file=sys.stderr)
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:9s} {help_text}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
