"""Multi-turn rollouts: our sampler (environment tokens appended to live sequences, prefilled
once) vs an HF `generate` loop that re-runs the whole conversation every turn.

A fixed 4-turn script: B prompts × G completions; each prompt is a question rendered with the
calculator tool's schema (what GRPOTrainer(tools=[calculator]) samples from; --prompt-len N uses
~N-token few-shot prompts instead); each model turn is forced to --turn-tokens tokens (ours:
ignore_eos + max_turn_tokens; HF: min_new_tokens = max_new_tokens), and after each of the first
three turns a fake tool answers with a fixed result, rendered as the trainer renders it (end of
the assistant turn, the tool message, the next assistant header). Both sides sample (T = 1) the same number of model
tokens. Reported per engine: model tokens/s (wall time of the whole rollout, every repeat
printed), and prompt tokens computed (ours: each prompt once + each observation once; HF: every
row's whole conversation, every turn).

    python benchmarks/bench_multiturn.py                 # CPU: 4 × 8, 4 turns of 32 tokens, SmolLM2-135M
    python benchmarks/bench_multiturn.py --turn-tokens 64 --repeats 3
    python benchmarks/bench_multiturn.py --bare          # the question alone, no tool schema: short prompts

The last line reads
`multiturn: ours X tok/s vs HF re-prefill Y tok/s = Zx; prompt tokens computed A vs B`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402
from bench_sampler import padded_prompts  # noqa: E402

from grpo_fast.models.default_model import default_model_dir  # noqa: E402
from grpo_fast.rollout import ToolCall, ToolResult, observation_tokens, render_prompt, tool_schema  # noqa: E402
from grpo_fast.rollout.builtin_tools import calculator  # noqa: E402
from grpo_fast.sampler import Sampler, SamplingParams  # noqa: E402

QUESTIONS = ["What is 17 * 23?", "What is 1234 + 5678?", "What is 99 * 99?", "What is 2 ** 10 - 7?"]


def tool_prompts(tok, questions, extra_len: int, bare: bool = False) -> list[list[int]]:
    """What the trainer samples from with tools=[calculator]: the chat template over the question,
    with the tool's schema in the system message (grpo_fast.rollout.render_prompt); --prompt-len
    adds few-shot lines to the system message first (bench_sampler's padded_prompts)."""
    if extra_len:
        return padded_prompts(tok, questions, extra_len)
    schema = [] if bare else [tool_schema(calculator)]
    return [render_prompt(tok, [{"role": "user", "content": q}], schema) for q in questions]


def script_tokens(tok) -> list[int]:
    """The fake tool's fixed reply as the trainer appends it after a model turn that stopped at
    </tool_call>: the end of the assistant turn, the tool message, the next assistant header."""
    result = ToolResult(ToolCall("calculator", {"expression": "17 * 23"}), "391")
    return observation_tokens(tok, [result], completion_text="</tool_call>", ended_turn=False)


def run_ours(sampler, prompts, G, turns, turn_tokens, reply, seed):
    def handler(turn):
        return list(reply) if turn.num_turns < turns else None

    max_tokens = turns * turn_tokens + (turns - 1) * len(reply) + 1
    params = SamplingParams(n=G, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=seed,
                            max_turn_tokens=turn_tokens)
    t = time.perf_counter()
    outs = sampler.generate(prompts, params, turn_handler=handler)
    seconds = time.perf_counter() - t
    model_tokens = sum(sum(c.model_mask) for o in outs for c in o.completions)
    assert all(c.num_turns == turns for o in outs for c in o.completions), "the script did not run every turn"
    return dict(seconds=seconds, model_tokens=model_tokens, tokens_per_s=model_tokens / seconds,
                prompt_tokens_computed=sampler.stats.prefill_tokens, stats=sampler.stats.as_dict())


@torch.no_grad()
def run_hf(model, tok, prompts, G, turns, turn_tokens, reply, seed):
    """Each turn: every row's whole conversation, left-padded, through `generate` again."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [list(p) for p in prompts for _ in range(G)]
    computed = model_tokens = 0
    torch.manual_seed(seed)
    t = time.perf_counter()
    for k in range(turns):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=turn_tokens, min_new_tokens=turn_tokens, pad_token_id=pad)
        computed += sum(len(r) for r in rows)
        new = out[:, width:].tolist()
        model_tokens += sum(len(x) for x in new)
        rows = [r + x + (list(reply) if k < turns - 1 else []) for r, x in zip(rows, new)]
    seconds = time.perf_counter() - t
    return dict(seconds=seconds, model_tokens=model_tokens, tokens_per_s=model_tokens / seconds,
                prompt_tokens_computed=computed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=0,
                    help="bring each prompt to ~this many tokens with a system message (bench_sampler's few-shot lines)")
    ap.add_argument("--bare", action="store_true",
                    help="prompts without the tool's schema (the question alone: the shortest conversations)")
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = tool_prompts(tok, (QUESTIONS * args.prompts)[:args.prompts], args.prompt_len, args.bare)
    reply = script_tokens(tok)
    sampler = Sampler(model, tok)
    record = dict(bench="multiturn", env=bu.environment(torch.device("cpu")), loadavg_before=bu.load_average(),
                  args=vars(args), reply_tokens=len(reply), runs=[])
    print(f"{args.prompts} prompts x {args.group} (prompt tokens {[len(p) for p in prompts]}), {args.turns} turns of "
          f"{args.turn_tokens} tokens, tool reply {len(reply)} tokens; {bu.device_name(torch.device('cpu'))}",
          flush=True)
    best = {}
    for rep in range(args.repeats):  # interleaved: both engines see the same machine state
        for name in ("ours", "hf"):
            fn = run_ours if name == "ours" else run_hf
            res = (fn(sampler, prompts, args.group, args.turns, args.turn_tokens, reply, 1000 + rep) if name == "ours"
                   else fn(model, tok, prompts, args.group, args.turns, args.turn_tokens, reply, 1000 + rep))
            record["runs"].append(dict(engine=name, repeat=rep, **{k: v for k, v in res.items() if k != "stats"}))
            print(f"  repeat {rep} {name:4s}: {res['model_tokens']} model tokens in {res['seconds']:.2f} s = "
                  f"{res['tokens_per_s']:.1f} tok/s, prompt tokens computed {res['prompt_tokens_computed']}", flush=True)
            if name not in best or res["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = res
    ours, hf = best["ours"], best["hf"]
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    expected = sum(len(p) for p in prompts) + args.prompts * args.group * (args.turns - 1) * len(reply)
    record.update(loadavg_after=bu.load_average(), best=dict(ours=ours, hf=hf), ratio=ratio,
                  expected_prompt_tokens_ours=expected)
    out = bu.write_results("bench_multiturn", record)
    print(f"prompt tokens ours: {ours['prompt_tokens_computed']} (each prompt once + each observation once = {expected})")
    print(f"wrote {out}")
    print(f"multiturn: ours {ours['tokens_per_s']:.1f} tok/s vs HF re-prefill {hf['tokens_per_s']:.1f} tok/s = "
          f"{ratio:.2f}x; prompt tokens computed {ours['prompt_tokens_computed']} vs {hf['prompt_tokens_computed']}")


if __name__ == "__main__":
    main()
