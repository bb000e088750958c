"""`grpo-fast` command line.

    grpo-fast train [--config cfg.yaml] [--key value ...] [--resume | --overwrite] [--merge]
    grpo-fast eval  [--config cfg.yaml] [--adapter DIR] [--key value ...]
    grpo-fast sample [--config cfg.yaml] [--adapter DIR] --prompt "What is 12 + 7?" [--n 4]
    grpo-fast plan  [--config cfg.yaml] [--device-memory 24GiB]
    grpo-fast --version

With no arguments, `train` runs the default job: SmolLM2-135M-Instruct + LoRA on the built-in
`arithmetic` task on the CPU, printing eval accuracy before and after (last line).
Overrides are `--section.field value` or `--field value` when the name is unique (every field:
grpo_fast/config.py). A mistake in what you gave (config, data, model, reward function, run
folder) is one line naming it; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from grpo_fast.config import DEFAULT_JOB, load_config
from grpo_fast.errors import ConfigError, TrainingStopped, UserError

TRAIN_EPILOG = """\
config overrides (any field, see grpo_fast/config.py or examples/cpu_default.yaml):
  --section.field VALUE      e.g. --train.max_steps 200 --loss.beta 0.04
  --field VALUE              when the name is unique: --learning_rate 1e-4 --num_generations 8

run folder (train.output_dir):
  --resume                   continue from the newest complete checkpoint (options that define the
                             weights or data must not change; learning rate, schedule, max_steps and
                             logging may, and are applied)
  --overwrite                start afresh in a folder that holds a run (removes its run files)
  --merge                    also save the merged model (adapter folded in) at the end

Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and the adapter, and exits;
a second Ctrl-C exits at once.
"""


def _split(argv: list[str], own: set[str]) -> tuple[list[str], list[str]]:
    """Separate this command's own flags (and their values) from config overrides."""
    mine, rest, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name in own:
            mine.append(tok)
            if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                mine.append(argv[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    return mine, rest


def _load(args, overrides: list[str]):
    """--config FILE, or the default job; then the overrides."""
    if args.config:
        return load_config(args.config, overrides)
    return load_config(None, overrides, base=DEFAULT_JOB)


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast train", description="GRPO fine-tuning with LoRA",
                                epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the built-in CPU default job)")
    mine, overrides = _split(argv, {"--config", "-h", "--help"})
    args = p.parse_args(mine)
    cfg = _load(args, overrides)
    from grpo_fast.trainer import GRPOTrainer

    GRPOTrainer(args=cfg).train()
    from grpo_fast import distributed

    distributed.shutdown()  # under torchrun: leave the process group (nothing otherwise)
    return 0


def _policy(cfg, adapter: str | None):
    from grpo_fast.train.model import load_base_model, load_tokenizer, resolve_device

    device = resolve_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast eval", description="Evaluate on the eval split: each eval reward's "
                                "mean and pass@k over eval.num_generations completions per prompt (1 = greedy)")
    p.add_argument("--config")
    p.add_argument("--adapter", help="a LoRA adapter folder (e.g. runs/default/adapter); omit for the base model")
    p.add_argument("--show", type=int, default=3, help="completions to print")
    mine, overrides = _split(argv, {"--config", "--adapter", "--show", "-h", "--help"})
    args = p.parse_args(mine)
    cfg = _load(args, overrides)
    from grpo_fast.data import encode_prompts, load_splits
    from grpo_fast.rewards import build_rewards
    from grpo_fast.train.evaluate import evaluate
    from grpo_fast.train.generation import Generator

    model, tokenizer = _policy(cfg, args.adapter)
    _, eval_rows = load_splits(cfg.data)
    if not eval_rows:
        raise ValueError("data: no eval rows (set data.eval_path, or data.eval_size / data.eval_fraction)")
    enc, _ = encode_prompts(eval_rows, tokenizer, cfg.data, cfg.sampling.max_prompt_length, "eval")
    names = cfg.eval.reward_funcs or (["accuracy"] if any(r.get("answer") for r in eval_rows) else cfg.rewards.funcs)
    rewards = build_rewards(cfg.rewards, cfg.sampling.max_completion_length, funcs=list(names))
    rewards.weights = [1.0] * len(names)
    result = evaluate(Generator(model, tokenizer, backend=cfg.sampling.backend, kv_budget=cfg.sampling.kv_budget),
                      tokenizer, enc, rewards, max_tokens=cfg.eval.max_completion_length or cfg.sampling.max_completion_length,
                      num_generations=cfg.eval.num_generations, temperature=cfg.eval.temperature,
                      stop=cfg.sampling.stop, success_threshold=cfg.eval.success_threshold, seed=cfg.train.seed,
                      num_samples=args.show)
    for sample in result.samples:
        print(f"{sample['prompt']!r} -> {sample['completion']!r}")
    print(eval_table(result.metrics, list(names)))
    if "eval/accuracy/mean" in result.metrics:
        print(f"eval accuracy: {100 * result.metrics['eval/accuracy/mean']:.1f}% ({result.num_prompts} prompts)")
    return 0


def eval_table(metrics: dict, names: list[str]) -> str:
    """One row per reward function: mean and every pass@k measured."""
    ks = sorted({int(k.rsplit("@", 1)[1]) for k in metrics if "/pass@" in k})
    header = ["reward", "mean"] + [f"pass@{k}" for k in ks]
    rows = [[name, _num(metrics.get(f"eval/{name}/mean"))] + [_num(metrics.get(f"eval/{name}/pass@{k}")) for k in ks]
            for name in names]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast sample", description="Sample completions for a prompt")
    p.add_argument("--config")
    p.add_argument("--adapter")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    mine, overrides = _split(argv, {"--config", "--adapter", "--prompt", "--n", "--seed", "-h", "--help"})
    args = p.parse_args(mine)
    cfg = _load(args, overrides)
    from grpo_fast.data import render_prompt
    from grpo_fast.train.generation import Generator

    model, tokenizer = _policy(cfg, args.adapter)
    ids = tokenizer(render_prompt(tokenizer, {"prompt": args.prompt}, cfg.data), add_special_tokens=False)["input_ids"]
    gen = Generator(model, tokenizer, backend=cfg.sampling.backend, kv_budget=cfg.sampling.kv_budget)
    temperature = cfg.sampling.temperature if args.n > 1 else 0.0
    (group,) = gen.generate([ids], n=args.n, temperature=temperature, max_tokens=cfg.sampling.max_completion_length,
                            top_p=cfg.sampling.top_p, stop=cfg.sampling.stop, seed=args.seed)
    for i, c in enumerate(group.completions):
        print(f"[{i}] ({c.finish_reason}) {tokenizer.decode(c.token_ids, skip_special_tokens=True)}")
    return 0


def cmd_plan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo-fast plan", description="The run's memory plan: predicted peak per phase "
                                "and component, from the configs alone (no weights loaded)")
    p.add_argument("--config")
    p.add_argument("--device-memory", help="e.g. 24GiB: say whether the run fits and the largest settings that do")
    p.add_argument("--nproc", type=int, default=1,
                   help="plan one rank of a torchrun run with N ranks (its B / N prompts; train.fsdp: 1/N of the weights)")
    mine, overrides = _split(argv, {"--config", "--device-memory", "--nproc", "-h", "--help"})
    args = p.parse_args(mine)
    cfg = _load(args, overrides)
    from grpo_fast import memory

    n = args.nproc
    if n < 1 or cfg.train.prompts_per_step % n:
        raise ConfigError(f"--nproc {n}: train.prompts_per_step ({cfg.train.prompts_per_step}) must split into {n} "
                          f"equal shares of whole groups")
    from grpo_fast.train.data_parallel import rank_config

    cfg = rank_config(cfg, world_size=n)  # one rank's share of the step
    size = memory.parse_size(args.device_memory) if args.device_memory else None
    shape = memory.read_shape(cfg.model)
    print((f"one rank of {n}:\n" if n > 1 else "") + memory.plan(cfg, size, shape=shape, world_size=n).table())
    if size is not None:
        print(f"\nlargest values that fit in {args.device_memory} (one at a time, the others as configured"
              + (f"; prompts_per_step is one rank's share" if n > 1 else "") + "):")
        for knob, value in memory.fit(cfg, size, shape=shape, world_size=n).items():
            print(f"  {knob:<32} {'nothing fits' if value is None else value}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] == "--version":
        from importlib.metadata import version

        print(f"grpo-fast {version('grpo-fast')}")
        return 0
    if not argv or argv[0].startswith("--"):
        argv = ["train", *argv]  # `grpo-fast` alone runs the default training job
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except TrainingStopped as exc:  # an interrupt or a non-finite stop: saved, and says how to go on
        _report(exc, debug)
        return exc.exit_code
    except (UserError, ValueError, OSError) as exc:  # what the user gave: one clear line
        _report(exc, debug)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print("interrupted", file=sys.stderr)
        return 130


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    message = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
    print(f"error: {message}" + ("" if debug else "  (--debug shows the traceback)"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
