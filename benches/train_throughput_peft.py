"""The PyTorch + PEFT side of `cargo bench --bench train_throughput`: the same training job.

SmolLM2-135M-Instruct (the GGUF that scripts/fetch_smollm2.sh fetches; or `--random`, a
randomly initialised LlamaForCausalLM of its shape), an adapter on all seven linears of every
layer (`--method`: LoRA r=16 alpha=32, DoRA r=16 alpha=32, or VeRA at PEFT's default r=256),
AdamW (lr 1e-4); by default batch 4 x 256 tokens, f32, CPU.

The GGUF is converted once into an HF dir beside it (`<name>-hf/`: transformers dequantizes it
and writes safetensors) and every run loads that dir: PyTorch at its best, since a model that
transformers loads from the GGUF directly trains slower (its dequantized tensors come out of
numpy in a layout that the first matmuls pay for). `--dtype bf16` casts the base model to bf16 while PEFT keeps the adapter weights (and so
the optimizer state) in f32, as candle-peft does; the loss is computed in f32 (transformers
upcasts the logits). Prints one JSON line: tokens/s over the timed steps and the peak memory
(this process's peak RSS on the CPU; torch.cuda.max_memory_allocated on a GPU).

    python benches/train_throughput_peft.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf |
        --random] [--device cpu|cuda:0] [--dtype f32|bf16] [--batch 4] [--seq 256] [--steps 5]
        [--warmup 1] [--method lora|dora|vera]

Pinned versions: tests/fixtures/requirements.txt (torch 2.15.0, peft 0.21.2).
"""

import argparse
import json
import os
import resource
import shutil
import time

import torch
from safetensors.torch import save_file
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss():
    """This process's peak RSS in bytes: VmHWM, which starts again at exec. (ru_maxrss does not:
    a child of the Rust bench would report at least the parent's RSS at the time of the fork.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def adapter_config(method):
    if method == "vera":
        return VeraConfig(r=256, target_modules=TARGETS, vera_dropout=0.0)
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, use_dora=method == "dora")


def hf_dir(gguf_path):
    """The HF dir converted from `gguf_path` (made on first use, atomically)."""
    stem = os.path.splitext(gguf_path)[0]
    out = stem + "-hf"
    if not os.path.exists(os.path.join(out, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
        )
        # transformers refuses save_pretrained on a GGUF-loaded model: write config and weights.
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights written are plain f32
        config.save_pretrained(tmp)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--random", action="store_true", help="a random model of SmolLM2-135M's shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--method", default="lora", choices=["lora", "dora", "vera"])
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # as candle's f32 matmuls
        torch.cuda.reset_peak_memory_stats(device)
    if args.random:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                             max_position_embeddings=8192, tie_word_embeddings=True)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        path = os.path.abspath(args.model)
        if path.endswith(".gguf"):
            path = hf_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    # autocast_adapter_dtype (PEFT's default) keeps the adapter weights in f32 on a bf16 base.
    model = get_peft_model(model, adapter_config(args.method))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the step, as candle-peft's loss read does
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        memory = torch.cuda.max_memory_allocated(device)
        measure = "torch.cuda.max_memory_allocated"
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        memory = peak_rss()
        measure = "peak RSS"
        reserved = None
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} + peft",
        "device": str(device),
        "dtype": args.dtype,
        "method": args.method,
        "threads": torch.get_num_threads(),
        "steps": len(times),
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_s": args.batch * args.seq * len(times) / sum(times),
        "peak_memory_bytes": memory,
        "memory_measure": measure,
        "max_memory_reserved_bytes": reserved,
        "last_loss": loss_value,
    }))


if __name__ == "__main__":
    main()
