"""Cross-validation against llama.cpp-family implementations.

- `pytest --parity ...`: a live llama-server (bitnet.cpp's or upstream's) vs our engine and server (peer.py,
  launcher.py, checks.py, test_live_server_parity.py). Deselected without --parity.
- `test_upstream_llama_cpp.py`: upstream llama.cpp through llama-cpp-python vs our engine, full logits; part of
  the normal suite (CI's real peer).
- `test_harness.py` + `replay_server.py`: the harness itself, tested against a stand-in that replays bitnet.cpp's
  recorded llama-server answers (harness testing only; it is not a peer).
See docs/parity.md.
"""
