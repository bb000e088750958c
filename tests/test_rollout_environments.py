"""TRL-style environment_factory (grpo_fast/rollout/environments.py)."""

import pytest

from grpo_fast.rollout import EnvironmentSpec, ToolCall, ToolExecutor, append_to_last_user


class Counter:
    """Counts up to a target; rewarded for hitting it exactly."""
    made = 0

    def __init__(self):
        Counter.made += 1
        self.value = 0
        self.target = None

    def reset(self, target: int, **row):
        self.value, self.target = 0, target
        return f" (reach {target})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value

    def get_reward(self) -> float:
        return 1.0 if self.value == self.target else 0.0

    def _helper(self):
        return "private"

    @property
    def expensive(self):
        raise AssertionError("properties must not be evaluated")


class Echo:
    def reset(self, **row):
        return None

    async def shout(self, text: str) -> str:
        """Shout the text.

        Args:
            text: What to shout.
        """
        return text.upper()


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: The key.
    """
    return key[::-1]


def test_one_instance_per_rollout_with_tools_reset_text_and_reward():
    spec = EnvironmentSpec(Counter, tools=[lookup])
    before = Counter.made
    a, b = spec.create({"target": 3, "prompt": "p"}), spec.create({"target": 5, "prompt": "p"})
    assert Counter.made == before + 2 and a.env is not b.env
    assert sorted(a.tools) == ["increment", "lookup"]  # public methods (+ standalone); no reset/get_reward/_helper
    assert [s["function"]["name"] for s in a.schemas] == ["lookup", "increment"]
    assert list(a.schemas[1]["function"]["parameters"]["properties"]) == ["by"]
    assert a.reset_text == " (reach 3)" and a.name == "Counter" and a.reward_name == "Counter"
    with ToolExecutor(timeout=5, max_workers=2) as ex:
        ex.run([ToolCall("increment", {"by": 3})], tools=a.tools)
        ex.run([ToolCall("increment", {"by": 2})], tools=b.tools)
    assert (a.env.value, b.env.value) == (3, 2)  # isolated state
    assert a.reward() == 1.0 and b.reward() == 0.0
    echo = EnvironmentSpec(Echo).create({})
    assert echo.reset_text is None and echo.reward() is None  # no get_reward: the reward funcs score it


def test_reset_text_appended_to_last_user_message():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "ok"}]
    inst = EnvironmentSpec(Counter).create({"target": 2})
    out = inst.apply_reset_text(msgs)
    assert out[1]["content"] == "Count (reach 2)" and msgs[1]["content"] == "Count"  # not mutated
    assert append_to_last_user(msgs, None) == msgs
    with pytest.raises(ValueError, match="no user message"):
        append_to_last_user([{"role": "system", "content": "s"}], "x")


def test_dict_of_factories_by_environment_column():
    spec = EnvironmentSpec({"count": Counter, "echo": Echo})
    c = spec.create({"environment": "count", "target": 1})  # 'environment' is not passed to reset
    e = spec.create({"environment": "echo", "text": "x"})
    assert (c.name, type(c.env)) == ("count", Counter) and (e.name, type(e.env)) == ("echo", Echo)
    assert list(e.tools) == ["shout"]  # only the selected environment's tools
    with ToolExecutor(timeout=5, max_workers=1) as ex:
        assert ex.run([ToolCall("shout", {"text": "hi"})], tools=e.tools)[0].content == "HI"  # async method
    with pytest.raises(ValueError, match=r"environment='chess'.*known: \['count', 'echo'\]"):
        spec.create({"environment": "chess"})
    with pytest.raises(ValueError, match=r"needs an 'environment' column.*\['count', 'echo'\]"):
        spec.create({"target": 1})


def test_environment_contract_errors():
    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: A number.
            """
            return x

    class BadTool:
        def reset(self, **row):
            return None

        def act(self, x):
            return x

    class BadReset:
        def reset(self, **row):
            return 42

    class BadReward(Echo):
        def get_reward(self):
            return "high"

    with pytest.raises(ValueError, match="NoReset.*no callable reset"):
        EnvironmentSpec(NoReset).create({})
    with pytest.raises(ValueError, match="environment BadTool: tool .*act has no docstring"):
        EnvironmentSpec(BadTool).create({})
    with pytest.raises(ValueError, match="BadReset.reset.. returned int"):
        EnvironmentSpec(BadReset).create({})
    with pytest.raises(ValueError, match="BadReward.get_reward.. returned 'high'"):
        EnvironmentSpec(BadReward).create({}).reward()
    with pytest.raises(ValueError, match="must be None, a callable or a dict"):
        EnvironmentSpec(3)
    with pytest.raises(ValueError, match="two tools are named 'lookup'"):
        EnvironmentSpec(Echo, tools=[lookup, lookup])


def test_async_get_reward():
    class Judge(Echo):
        async def get_reward(self):
            return 0.5

    assert EnvironmentSpec(Judge).create({}).reward() == 0.5


def test_tools_only_spec_is_the_same_path():
    inst = EnvironmentSpec(None, tools=[lookup]).create({"prompt": "p"})
    assert inst.env is None and list(inst.tools) == ["lookup"] and inst.reset_text is None
    assert inst.schemas[0]["function"]["name"] == "lookup" and inst.reward() is None
