"""A tiny Llama-3.1-shaped Hugging Face folder standing in for a published model on a machine without one:
``python -m benchmarks.tiny_llama OUT [--files 400]`` (writes OUT/ and OUT/corpus.jsonl).

config.json as Llama-3.1 writes it (rope_theta 500,000, "llama3" rope scaling, untied embeddings), random
weights (transformers' init, perturbed), a byte-level BPE tokenizer of 256 tokens trained on this Python's
standard library, and a JSONL corpus of stdlib files (long-tailed lengths). Needs transformers (dev extra).
"""

from __future__ import annotations

import argparse
import glob
import json
import sysconfig
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiny_llama", description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--files", type=int, default=400, help="stdlib files in the corpus")
    args = ap.parse_args(argv)
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(args.out)
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))
    texts = [Path(f).read_text(errors="replace") for f in files[: args.files]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<|begin_of_text|>"],
                                                       initial_alphabet=[]))  # fmt: skip
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                   bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if "norm" not in name else 0.0))
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<|begin_of_text|>"}))  # fmt: skip
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    print(json.dumps({"model": str(out), "tokenizer_vocab": tok.get_vocab_size(), "corpus": str(corpus),
                      "documents": len(texts)}))  # fmt: skip


if __name__ == "__main__":
    main()
