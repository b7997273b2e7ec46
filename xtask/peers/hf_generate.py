"""transformers on the CPU, the peer of `bench generate`: greedy decode tokens/s.

usage: hf_generate.py MODEL_DIR TOKENS THREADS PROMPT
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, tokens, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="auto")
model.eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    t1 = time.perf_counter()
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    t3 = time.perf_counter()
print(json.dumps({
    "prompt_tokens": ids.shape[1],
    "prompt_tokens_per_s": ids.shape[1] / (t1 - t0),
    "decode_tokens_per_s": (tokens - 1) / (t3 - t2),
    "threads": threads,
}))
