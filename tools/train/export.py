"""Export a training checkpoint as a Hugging Face folder laid out like the tiny-bitnet-b158 fixture.

    python tools/train/export.py --ckpt out/train/run/best.pt --tokenizer out/train/tokenizer --out out/train/hf

Writes config.json (model_type bitnet, BitNetForCausalLM, relu2, online bitnet quantization_config),
generation_config.json, model.safetensors (bf16 latent weights, `model.` names, no lm_head: tied) and the
tokenizer files. The weights are rounded to bf16 here; everything downstream (eval, references, the GGUF)
uses exactly these bf16 values widened to float32.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import BitNetConfig, BitNetLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_config(cfg: BitNetConfig) -> dict:
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "relu2",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
    }


def config_from_checkpoint(d: dict) -> BitNetConfig:
    d = dict(d)
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    d["dropout"] = 0.0
    return BitNetConfig(**d)


def export(ckpt_path: Path, tokenizer_dir: Path, out: Path) -> None:
    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    cfg = config_from_checkpoint(ck["config"])
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.to(torch.bfloat16).contiguous() for k, v in ck["model"].items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    print(f"step {ck['step']} (held-out loss {ck['best']:.4f}) -> {out}: {len(tensors)} tensors")


def load_hf(hf_dir: Path) -> BitNetLM:
    """The exported folder back as a float32 BitNetLM in eval mode (bf16 weights widened exactly)."""
    c = json.loads((hf_dir / "config.json").read_text())
    cfg = BitNetConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                       intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                       num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                       rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                       max_position_embeddings=c["max_position_embeddings"], bos_token_id=c["bos_token_id"],
                       eos_token_ids=tuple(c["eos_token_id"]))
    model = BitNetLM(cfg)
    state = {k.removeprefix("model."): v.float() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("out/train/run/best.pt"))
    ap.add_argument("--tokenizer", type=Path, default=Path("out/train/tokenizer"))
    ap.add_argument("--out", type=Path, default=Path("out/train/hf"))
    args = ap.parse_args()
    export(args.ckpt, args.tokenizer, args.out)


if __name__ == "__main__":
    main()
