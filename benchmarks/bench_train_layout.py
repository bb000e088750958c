"""Training forward + backward of `completion_hidden` over B x G = 4 x 8 rows, SmolLM2-135M +
LoRA r = 16, random tokens, 3 repeats alternating after a warm-up of each:

- packed / cached: each micro-batch runs its own rows (the prompt once per micro-batch it touches)
  in the packed (block mask) or cached (prompt K/V repeated) layout;
- group-prompts (when the micro-batch is smaller than a group): each group's prompt runs once for
  all its micro-batches and is backpropagated after the last (grpo_fast.train.group_prompts).

    python benchmarks/bench_train_layout.py P C [MB] [--repeat-kv]
        # prompt, completion lengths, rows per micro-batch (default 40 128 8); --repeat-kv adds
        # each layout with HF's K/V repeated to the query heads where completions attend over a
        # cached prompt (without kv_head_attention.py),
        # interleaved with ours
"""
import contextlib, sys, time, torch
from _bench_utils import lora_policy_and_batch
from grpo_fast.train import packed_forward as pf
from grpo_fast.train.group_prompts import GroupPrompts
from grpo_fast.train.packed_forward import completion_hidden
REPEAT = "--repeat-kv" in sys.argv
args = [int(a) for a in sys.argv[1:] if a != "--repeat-kv"]
B, G = 4, 8
P, C, MB = (args + [40, 128, 8][len(args):])[:3]
model, pol, batch, w = lora_policy_and_batch(B, G, P, C)
cuts = [slice(s, s + MB) for s in range(0, B * G, MB)]
def step(variant):
    layout, _, repeat = variant.partition("+")
    own = pf.kv_head_attention
    if repeat:  # HF's own choice: K/V repeated under a mask
        pf.kv_head_attention = lambda enabled=True: contextlib.nullcontext(False)
    try:
        return _step(layout)
    finally:
        pf.kv_head_attention = own
def _step(layout):
    t0 = time.perf_counter()
    prompts = GroupPrompts.for_pass(pol.decoder, batch, cuts) if layout == "group-prompts" else None
    if layout == "group-prompts" and prompts is None:
        raise SystemExit(f"group-prompts: micro-batches of {MB} keep the groups whole (or the prompts are too short to share)")
    for rows in cuts:
        part = batch.select(rows)
        if prompts is not None:
            h = completion_hidden(pol.decoder, part, prefix=prompts.prefix(rows))
        else:
            h = completion_hidden(pol.decoder, part, layout=layout)
        (h @ w).sum().backward()
        if prompts is not None:
            prompts.finish(rows)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
layouts = ["packed", "cached"] + (["group-prompts"] if MB < G else [])
layouts = [v for layout in layouts for v in ([layout, layout + "+repeat-kv"] if REPEAT else [layout])]
with torch.no_grad():
    a = completion_hidden(pol.decoder, batch.select(slice(0, 8)), layout="packed")
    b = completion_hidden(pol.decoder, batch.select(slice(0, 8)), layout="cached")
    print("max diff packed vs cached", float((a - b).abs().max()))
print(f"P={P} C={C} micro-batch={MB} rows, {B}x{G}", flush=True)
for layout in layouts:
    step(layout)
for rep in range(3):
    for layout in layouts:
        print(rep, layout, f"{step(layout):.2f} s", flush=True)
