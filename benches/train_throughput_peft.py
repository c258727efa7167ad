"""The PyTorch + PEFT side of `cargo bench --bench train_throughput`: the same training job.

SmolLM2-135M-Instruct (the GGUF that scripts/fetch_smollm2.sh fetches, dequantized to f32 by
transformers), LoRA r=16 alpha=32 on all seven linears of every layer, batch 4 x 256 tokens,
AdamW (lr 1e-4), CPU, f32. Prints one JSON line: tokens/s over the timed steps and the peak RSS
of this process.

    python benches/train_throughput_peft.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--steps 5] [--warmup 1]

Pinned versions: tests/fixtures/requirements.txt (torch 2.15.0, peft 0.21.2).
"""

import argparse
import json
import os
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BATCH, SEQ = 4, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    path = os.path.abspath(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} + peft",
        "threads": torch.get_num_threads(),
        "steps": len(times),
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_s": BATCH * SEQ * len(times) / sum(times),
        "peak_rss_bytes": rss,
        "last_loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
