"""Training forward + backward: packed (block mask) vs cached (prompt K/V repeated) layout,
SmolLM2-135M + LoRA r = 16, B x G = 4 x 8 random tokens, one group per micro-batch, 3 repeats
alternating after a warm-up of each.

    python benchmarks/bench_train_layout.py P C     # prompt and completion lengths (default 40 128)
"""
import sys, time, torch
from _bench_utils import lora_policy_and_batch
from grpo_fast.train.packed_forward import completion_hidden
B, G, P, C = 4, 8, int(sys.argv[1]) if len(sys.argv) > 1 else 40, int(sys.argv[2]) if len(sys.argv) > 2 else 128
model, pol, batch, w = lora_policy_and_batch(B, G, P, C)
def step(layout, mb=8):
    t0 = time.perf_counter()
    for s in range(0, B * G, mb):
        part = batch.select(slice(s, s + mb))
        h = completion_hidden(pol.decoder, part, layout=layout)
        (h @ w).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
with torch.no_grad():
    a = completion_hidden(pol.decoder, batch.select(slice(0, 8)), layout="packed")
    b = completion_hidden(pol.decoder, batch.select(slice(0, 8)), layout="cached")
    print("max diff packed vs cached", float((a - b).abs().max()))
step("packed"); step("cached")
for rep in range(3):
    for layout in ("packed", "cached"):
        print(rep, layout, f"{step(layout):.2f} s", flush=True)
