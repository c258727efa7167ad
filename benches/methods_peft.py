"""The PyTorch + PEFT side of `cargo bench --bench methods -- --python <venv python>`.

One training step (forward + backward, the input requiring a gradient) of each adapter method on
one (4096, 4096) linear layer with 512 tokens, f32, CPU, with the configurations of
benches/methods.rs: LoRA and DoRA r=16 alpha=32 (random B), VeRA r=256 and RandLoRA r=32 (PEFT's
default ranks, random lambdas). Prints one JSON line: the median seconds per step of each method.

    python benches/methods_peft.py [--steps 10] [--warmup 2]

Pinned versions: tests/fixtures/requirements.txt (torch 2.15.0, peft 0.21.2).
"""

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, RandLoraConfig, VeraConfig, get_peft_model

TOKENS, DIM, RANK = 512, 4096, 16


class Layer(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = torch.nn.Linear(DIM, DIM, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def configs():
    lora = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    return {
        "LoRA": LoraConfig(**lora),
        "DoRA": LoraConfig(use_dora=True, **lora),
        "VeRA r=256": VeraConfig(r=256, target_modules=["proj"], init_weights=False),
        "RandLoRA r=32": RandLoraConfig(r=32, target_modules=["proj"], init_weights=False),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(DIM, DIM) * 0.02
    x = torch.randn(TOKENS, DIM, requires_grad=True)
    seconds = {}
    for name, config in configs().items():
        model = get_peft_model(Layer(weight), config)
        model.train()
        times = []
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            model(x).backward(torch.ones(TOKENS, DIM))
            model.zero_grad(set_to_none=True)
            x.grad = None
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    print(json.dumps({"impl": f"pytorch {torch.__version__} + peft", "threads": torch.get_num_threads(),
                      "seconds_per_step": seconds}))


if __name__ == "__main__":
    main()
