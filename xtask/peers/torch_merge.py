"""The way Python tools merge a TP-sharded .nemo into HF safetensors, for benchmarks.

Extract the archive, torch.load every rank file, concatenate per tensor, split
QKV / gate-up, save with safetensors.torch.save_file. Usage:
    python torch_merge.py IN.nemo OUT_DIR
"""
import os
import sys
import tarfile
import tempfile

import torch
import yaml
from safetensors.torch import save_file


def main(src, out):
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        with tarfile.open(src, "r:") as t:
            t.extractall(tmp)
        cfg = yaml.safe_load(open(os.path.join(tmp, "model_config.yaml")))
        tp = cfg["tensor_model_parallel_size"]
        ranks = [torch.load(os.path.join(tmp, f"mp_rank_{r:02d}", "model_weights.ckpt"), map_location="cpu", weights_only=True) for r in range(tp)]
    h, heads, f, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["ffn_hidden_size"], cfg["num_layers"]
    hd = h // heads
    lm = "model.language_model"
    cat0 = lambda k: torch.cat([r[k] for r in ranks], 0)
    cat1 = lambda k: torch.cat([r[k] for r in ranks], 1)
    out_sd = {"model.embed_tokens.weight": cat0(f"{lm}.embedding.word_embeddings.weight")[:32000].clone()}
    for l in range(L):
        p = f"{lm}.encoder.layers.{l}"
        q = cat0(f"{p}.self_attention.query_key_value.weight").view(heads, 3, hd, h)
        out_sd[f"model.layers.{l}.input_layernorm.weight"] = ranks[0][f"{p}.input_layernorm.weight"]
        out_sd[f"model.layers.{l}.self_attn.q_proj.weight"] = q[:, 0].reshape(-1, h).clone()
        out_sd[f"model.layers.{l}.self_attn.k_proj.weight"] = q[:, 1].reshape(-1, h).clone()
        out_sd[f"model.layers.{l}.self_attn.v_proj.weight"] = q[:, 2].reshape(-1, h).clone()
        out_sd[f"model.layers.{l}.self_attn.o_proj.weight"] = cat1(f"{p}.self_attention.dense.weight")
        out_sd[f"model.layers.{l}.post_attention_layernorm.weight"] = ranks[0][f"{p}.post_attention_layernorm.weight"]
        gu = [r[f"{p}.mlp.dense_h_to_4h.weight"] for r in ranks]
        out_sd[f"model.layers.{l}.mlp.gate_proj.weight"] = torch.cat([g[: f // tp] for g in gu], 0)
        out_sd[f"model.layers.{l}.mlp.up_proj.weight"] = torch.cat([g[f // tp :] for g in gu], 0)
        out_sd[f"model.layers.{l}.mlp.down_proj.weight"] = cat1(f"{p}.mlp.dense_4h_to_h.weight")
    out_sd["model.norm.weight"] = ranks[0][f"{lm}.encoder.final_layernorm.weight"]
    out_sd["lm_head.weight"] = cat0(f"{lm}.output_layer.weight")[:32000].clone()
    del ranks
    save_file(out_sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
