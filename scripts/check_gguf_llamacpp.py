"""Loads a GGUF file with llama.cpp (llama-cpp-python) and prints its greedy continuation of a
prompt, and the logits of the prompt's last position, as JSON: the check that a file written by
`candle-peft merge --output-gguf` is one llama.cpp reads and runs the same way candle-peft does.

    python scripts/check_gguf_llamacpp.py merged.gguf "The capital of France is" 12
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
# The BOS the model adds, if any (llama.cpp reads it from the file, as candle-peft does).
ids = llm.tokenize(prompt.encode(), add_bos=True)
llm.eval(ids)
last = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
out = []
for _ in range(n):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(token)
    llm.eval([token])
print(json.dumps({"ids": ids, "greedy": out, "text": llm.detokenize(out).decode(errors="replace"),
                  "last_logits_head": last[:8].tolist(), "last_argmax": int(np.argmax(last))}))
