"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/ from the repository's
own files: the tiny LLaMA's adapters (one per method), the family fixtures' GGUFs and configs,
a tiny LLaMA GGUF with a byte-level BPE tokenizer (gguf-py's writer), the first 64 KiB of
SmolLM2's GGUF (its header), tokenizers, JSONL records, the sweep configs, and a real trainer
checkpoint written by `candle-peft train` on the tiny LLaMA.

    /work/venv/bin/python fuzz/make_seeds.py   # needs torch, safetensors, gguf; target/debug/candle-peft
"""
import glob
import json
import os
import shutil
import subprocess
import tempfile

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
ADAPTERS = ["lora", "dora", "loha", "vera", "randlora", "randlora_wide", "rslora_all_linear", "lora_layers"]


def put(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def tiny_gguf_with_bpe():
    """The tiny LLaMA as llama.cpp names it (q/k rows permuted), f32, with a byte-level BPE
    tokenizer of 64 tokens and 3 merges."""
    config = json.load(open(os.path.join(FIX, "tiny_llama", "config.json")))
    state = load_file(os.path.join(FIX, "tiny_llama", "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(64)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])

    def permute(t, n_head):
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    tokens = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    tokens += ["\u0120", "\u0120t", "th", "the", "he", "0", "1", "2", "+", "=", "?"]
    tokens = tokens[:config["vocab_size"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["\u0120 t", "t h", "th e"])
    w.add_eos_token_id(0)
    w.add_bos_token_id(0)
    for k, v in state.items():
        if ".q_proj." in k:
            v = permute(v, config["num_attention_heads"])
        elif ".k_proj." in k:
            v = permute(v, config["num_key_value_heads"])
        w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read(path)


def checkpoint_files():
    """trainer_state.json and optimizer.safetensors of a 1-step LoRA r = 2 (q, v) run of
    `candle-peft train` on the tiny LLaMA, the run that the checkpoint target resumes."""
    run = tempfile.mkdtemp()
    model = os.path.join(run, "model")
    os.makedirs(model)
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(os.path.join(FIX, "tiny_llama", f), model)
    shutil.copy(os.path.join(FIX, "tiny_llama_tokenizer.json"), os.path.join(model, "tokenizer.json"))
    data = os.path.join(run, "train.jsonl")
    with open(data, "w") as f:
        f.write('{"text": "the cat sat on the mat"}\n')
    out = os.path.join(run, "out")
    subprocess.run([os.path.join(ROOT, "target", "debug", "candle-peft"), "train", "--model", model, "--data", data,
                    "--output", out, "--method", "lora", "--rank", "2", "--alpha", "4", "--targets", "q_proj,v_proj",
                    "--steps", "1", "--batch-size", "1", "--every", "1", "--device", "cpu"], check=True,
                   capture_output=True)
    ckpt = os.path.join(out, "checkpoint-1")
    return read(os.path.join(ckpt, "trainer_state.json")), read(os.path.join(ckpt, "optimizer.safetensors"))


def main():
    shutil.rmtree(CORPUS, ignore_errors=True)
    for i, a in enumerate(ADAPTERS):
        d = os.path.join(FIX, "tiny_llama", a)
        put("adapter_config", a, bytes([i]) + read(os.path.join(d, "adapter_config.json")))
        put("adapter_weights", a, bytes([i]) + read(os.path.join(d, "adapter_model.safetensors")))
    for g in sorted(glob.glob(os.path.join(FIX, "families", "*", "model.gguf"))):
        put("gguf", os.path.basename(os.path.dirname(g)), read(g))
    put("gguf", "tiny_llama_bpe", tiny_gguf_with_bpe())
    put("gguf", "smollm2_head", read(os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))[:65536])
    put("model_config", "tiny_llama", read(os.path.join(FIX, "tiny_llama", "config.json")))
    for g in sorted(glob.glob(os.path.join(FIX, "families", "*", "config.json"))):
        put("model_config", os.path.basename(os.path.dirname(g)), read(g))
    put("tokenizer", "word_level", read(os.path.join(FIX, "tiny_llama_tokenizer.json")))
    bpe = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "vocab": {t: i for i, t in enumerate(["<unk>", "h", "e", "l", "o", "he", "ll", "hell", "hello"])},
                     "merges": ["h e", "l l", "he ll", "hell o"]}}
    put("tokenizer", "bpe", json.dumps(bpe).encode())
    put("jsonl", "records", b'{"prompt": "2+2=", "completion": "4"}\n{"text": "Hello there."}\n\n'
                            b'{"prompt": "", "completion": "x"}\n')
    for f in sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))):
        put("sweep_config", os.path.basename(f)[:-len(".json")], read(f))
    state, optimizer = checkpoint_files()
    put("checkpoint", "trainer_state", b"\x00" + state)
    put("checkpoint", "optimizer", b"\x01" + optimizer)


if __name__ == "__main__":
    main()
