#!/usr/bin/env python
"""Start the bitnet-py server: `python serve.py --model path/to/model.gguf --threads $(nproc)`."""
import sys

from bitnet_py.server_cli import main

if __name__ == "__main__":
    sys.exit(main())
