"""examples/tool_calculator.yaml in Python, with TRL 1.16's API: a tool is a plain function (its
signature and docstring describe it to the model) passed as GRPOTrainer(tools=[...]).

    python examples/tool_calculator.py [--max_steps N]
"""

import sys

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.rollout.builtin_tools import calculator


def main(argv: list[str]) -> None:
    steps = int(argv[argv.index("--max_steps") + 1]) if "--max_steps" in argv else 40
    args = GRPOConfig(
        output_dir="runs/tool_calculator_py", max_steps=steps, num_generations=8, per_device_train_batch_size=32,
        max_completion_length=128, max_prompt_length=512, learning_rate=5e-4, warmup_steps=2, loss_type="dapo",
        epsilon=0.2, epsilon_high=0.28, max_tool_calling_iterations=2, reward_weights=[1.0, 0.2],
        **{"data.task": "arithmetic", "data.difficulty": "medium", "data.eval_size": 20,
           "data.prompt_template": '{prompt} You can use the calculator: <tool_call>{{"name": "calculator", '
                                   '"arguments": {{"expression": "{expression}"}}}}</tool_call>',
           "train.micro_batch_size": 8, "train.time_budget_s": 840, "tools.tool_timeout_s": 5})
    trainer = GRPOTrainer(reward_funcs=["accuracy", "tool_use"], args=args, tools=[calculator])
    result = trainer.train()
    print(f"eval before {result.eval_before}, after {result.eval_after}")


if __name__ == "__main__":
    main(sys.argv[1:])
