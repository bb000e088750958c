"""Eval accuracy: greedy completions on the held-out split, scored by the `accuracy` reward."""

from __future__ import annotations

from dataclasses import dataclass

from grpo_fast.rewards import accuracy


@dataclass
class EvalResult:
    accuracy: float  # fraction of scorable eval prompts answered correctly
    num_prompts: int
    samples: list[dict]  # a few (prompt, completion, correct) for the logs


def evaluate(generator, tokenizer, encoded: list, *, max_tokens: int, stop=None, batch_size: int = 64,
             num_samples: int = 3) -> EvalResult:
    """Greedy (temperature 0) completion per prompt; accuracy over the rows with an answer."""
    correct, scored, samples = 0.0, 0, []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        groups = generator.generate([e.ids for e in chunk], n=1, temperature=0.0, max_tokens=max_tokens, stop=stop)
        texts = [tokenizer.decode(g.completions[0].token_ids, skip_special_tokens=True) for g in groups]
        rows = [e.row for e in chunk]
        scores = accuracy([r["prompt"] for r in rows], texts, [r.get("answer") for r in rows],
                          task=[r.get("task") for r in rows])
        for row, text, s in zip(rows, texts, scores):
            if s is None:
                continue
            correct += s
            scored += 1
            if len(samples) < num_samples:
                samples.append({"prompt": row["prompt"], "completion": text, "answer": row.get("answer"),
                                "correct": bool(s)})
    return EvalResult(correct / scored if scored else 0.0, scored, samples)
