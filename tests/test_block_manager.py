"""Block manager: hand-worked cases, then hypothesis property tests over random op sequences.

The property driver runs the C++ manager and its Python twin side by side on the same ops and
keeps a shadow KV pool (slot -> token id whose KV it holds). Each "forward" writes a token's
slot, and asserts the block being written is held by the writer alone (a shared block is never
written). After every op: ref counts equal the number of tables holding each block, free and
used blocks partition the pool, every sequence reads back its own tokens through its block table
(so a forked child sees the parent's prompt), and both managers agree exactly.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_fast.kv import BlockManager, NativeBlockManager, OutOfBlocksError, PyBlockManager
from grpo_fast.kv.block_manager import _Native

MANAGERS = [PyBlockManager] + ([NativeBlockManager] if _Native is not None else [])


def test_native_manager_is_the_default():
    assert _Native is not None, "grpo_fast._C was built without the block manager"
    assert BlockManager is NativeBlockManager


@pytest.mark.parametrize("cls", MANAGERS)
def test_fork_shares_partial_block_and_copies_on_first_append(cls):
    bm = cls(16, 4)
    assert bm.allocate(0, list(range(10))) == 0  # 3 blocks, the last holds 2 tokens
    bm.fork(0, [1, 2, 3])
    bm.free(0)  # the sampler drops the parent after forking
    assert bm.num_free_blocks == 13  # 3 blocks for 4 sequences
    copies = [bm.append_token(c) for c in (1, 2, 3)]
    # first two children copy the shared partial block; the last holder writes in place
    assert copies[0] == [(2, 3)] and copies[1] == [(2, 4)] and copies[2] == []
    assert bm.block_table(3) == [0, 1, 2]
    assert bm.num_free_blocks == 11
    slots, tables, lens = bm.decode_metadata([1, 2, 3])
    assert slots.tolist() == [3 * 4 + 2, 4 * 4 + 2, 2 * 4 + 2]
    assert tables.dtype == torch.int32 and tables.tolist() == [[0, 1, 3], [0, 1, 4], [0, 1, 2]]
    assert lens.tolist() == [11, 11, 11]
    assert bm.stats()["blocks_saved_by_sharing"] == 4  # blocks 0 and 1 held 3 times each


@pytest.mark.parametrize("cls", MANAGERS)
def test_full_last_block_needs_no_copy(cls):
    bm = cls(16, 4)
    bm.allocate(0, list(range(8)))
    bm.fork(0, [1, 2])
    assert bm.append_token(1) == [] and bm.append_token(2) == []
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2] == bm.block_table(0)
    assert bm.block_table(1)[2] != bm.block_table(2)[2]


@pytest.mark.parametrize("cls", MANAGERS)
def test_prefix_cache_hit_confirms_tokens_and_evicts_lru(cls):
    bm = cls(6, 4)
    system = [7, 7, 7, 7, 8, 8, 8, 8]
    assert bm.allocate(0, system + [1, 2]) == 0
    assert bm.allocate(1, system + [3]) == 8  # two full blocks shared
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert bm.stats()["prefix_cache_hits"] == 2
    # a prompt that is exactly the cached blocks still recomputes its last block
    assert bm.allocate(2, system) == 4
    bm.free(0), bm.free(1), bm.free(2)
    assert bm.num_free_blocks == 6 and bm.stats()["cached_free_blocks"] == 2
    assert bm.allocate(3, system + [9]) == 8  # cached blocks survive free
    bm.free(3)
    bm.allocate(4, list(range(100, 124)))  # needs all 6 blocks: evicts the cached ones
    bm.free(4)
    assert bm.allocate(5, system + [9]) == 0


@pytest.mark.parametrize("cls", MANAGERS)
def test_reset_prefix_cache_forgets_everything(cls):
    bm = cls(8, 4)
    bm.allocate(0, list(range(9)))
    bm.reset_prefix_cache()
    assert bm.allocate(1, list(range(9))) == 0
    bm.free(0), bm.free(1)
    assert bm.stats()["cached_free_blocks"] == 2  # seq 1 re-registered its two full blocks
    bm.reset_prefix_cache()
    assert bm.num_free_blocks == 8 and bm.stats()["cached_free_blocks"] == 0
    assert bm.allocate(2, list(range(9))) == 0


@pytest.mark.parametrize("cls", MANAGERS)
def test_out_of_blocks_is_distinct_and_leaves_state_unchanged(cls):
    bm = cls(4, 4)
    bm.allocate(0, list(range(13)))  # 4 blocks
    assert not bm.can_allocate(1) and bm.can_append(0)  # last block has room, held alone
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1, [1])
    assert not bm.has_seq(1)
    bm.fork(0, [1])
    assert not bm.can_append(1)  # partial shared block, no block to copy into
    with pytest.raises(OutOfBlocksError):
        bm.append_token(1)
    assert bm.num_tokens(1) == 13 and bm.block_table(1) == bm.block_table(0)
    assert issubclass(OutOfBlocksError, RuntimeError) and not issubclass(OutOfBlocksError, ValueError)


@pytest.mark.parametrize("cls", MANAGERS)
def test_invalid_arguments_raise_value_error(cls):
    with pytest.raises(ValueError, match="num_blocks"):
        cls(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        cls(4, 0)
    with pytest.raises(ValueError, match="int32"):
        cls(2**28, 16)
    bm = cls(4, 4)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(0, [])
    bm.allocate(0, [1, 2])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(0, [1])
    with pytest.raises(ValueError, match="not allocated"):
        bm.free(9)
    with pytest.raises(ValueError, match="not allocated"):
        bm.fork(9, [1])
    with pytest.raises(ValueError):
        bm.fork(0, [0])
    with pytest.raises(ValueError):
        bm.slot_mapping(0, 1, 5)
    assert bm.slot_mapping(0, 0, 2).tolist() == bm.slot_mapping(0).tolist() == [0, 1]


# ---- property tests -----------------------------------------------------------------------------

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5, 5]]

op = st.one_of(
    st.tuples(st.just("allocate"), st.integers(0, 2), st.lists(st.integers(0, 3), max_size=9)),
    st.tuples(st.just("fork"), st.integers(0, 99), st.integers(1, 4)),
    st.tuples(st.just("append"), st.integers(0, 99), st.integers(0, 50)),
    st.tuples(st.just("free"), st.integers(0, 99)),
    st.tuples(st.just("preempt"), st.integers(0, 99)),
    st.tuples(st.just("reset_cache"),),
)


class Driver:
    """Runs every op on all managers, mirrors KV writes into a shadow pool, checks invariants."""

    def __init__(self, num_blocks, block_size, prefix):
        self.ms = [cls(num_blocks, block_size, prefix) for cls in MANAGERS]
        self.bs = block_size
        self.tokens: dict[int, list[int]] = {}  # seq -> its tokens (prompt + generated)
        self.shadow: dict[int, int] = {}  # slot -> token whose KV the slot holds
        self.next_id = 0

    @property
    def m(self):
        return self.ms[0]

    def all(self, name, *args):
        outs, errs = [], []
        for m in self.ms:
            try:
                outs.append(getattr(m, name)(*args))
                errs.append(None)
            except OutOfBlocksError:
                outs.append(None)
                errs.append(OutOfBlocksError)
        assert len(set(errs)) == 1, f"managers disagree on {name}{args}: {errs}"
        if errs[0] is None:
            assert all(o == outs[0] for o in outs), f"managers disagree on {name}{args}: {outs}"
        return outs[0], errs[0]

    def write(self, seq, pos):
        """The forward pass writes the KV of token `pos` of `seq` into its slot."""
        block = self.m.block_table(seq)[pos // self.bs]
        assert self.m.ref_count(block) == 1, f"write into shared block {block}"
        self.shadow[block * self.bs + pos % self.bs] = self.tokens[seq][pos]

    def seq_ids(self):
        return sorted(self.tokens)

    def pick(self, i):
        ids = self.seq_ids()
        return ids[i % len(ids)] if ids else None

    def allocate(self, tokens):
        sid = self.next_id
        self.next_id += 1
        snapshot = self.state()
        cached, err = self.all("allocate", sid, tokens)
        if err:
            assert self.state() == snapshot and not self.m.has_seq(sid)
            return
        assert cached % self.bs == 0 and 0 <= cached < len(tokens)
        self.tokens[sid] = list(tokens)
        for pos in range(cached):  # cached prefix: its KV must already be there
            slot = int(self.m.slot_mapping(sid, pos, pos + 1)[0])
            assert self.shadow.get(slot) == tokens[pos]
        for pos in range(cached, len(tokens)):
            self.write(sid, pos)

    def step(self, o):
        kind = o[0]
        if kind == "allocate":
            self.allocate(PREFIXES[o[1]] + o[2])
        elif kind == "reset_cache":
            self.all("reset_prefix_cache")
        elif (sid := self.pick(o[1])) is None:
            return
        elif kind == "fork":
            kids = list(range(self.next_id, self.next_id + o[2]))
            self.next_id += o[2]
            self.all("fork", sid, kids)
            for k in kids:
                self.tokens[k] = list(self.tokens[sid])
        elif kind == "append":
            snapshot = self.state()
            can = self.m.can_append(sid)
            copies, err = self.all("append_token", sid)
            assert can == (err is None)
            if err:
                assert self.state() == snapshot
                return
            for src, dst in copies:  # copy_blocks before the write
                for off in range(self.bs):
                    if src * self.bs + off in self.shadow:
                        self.shadow[dst * self.bs + off] = self.shadow[src * self.bs + off]
            self.tokens[sid].append(o[2])
            self.write(sid, len(self.tokens[sid]) - 1)
        elif kind == "free":
            self.all("free", sid)
            del self.tokens[sid]
        elif kind == "preempt":  # scheduler: drop the blocks, recompute from all tokens later
            toks = self.tokens.pop(sid)
            self.all("free", sid)
            self.allocate(toks)

    def state(self):
        return [(m.num_free_blocks, {s: m.block_table(s) for s in self.tokens}) for m in self.ms]

    def check(self):
        for m in self.ms:
            holders = [0] * m.num_blocks
            for s in self.tokens:
                table = m.block_table(s)
                assert len(table) == -(-len(self.tokens[s]) // self.bs)
                assert len(set(table)) == len(table)
                assert m.num_tokens(s) == len(self.tokens[s])
                for b in table:
                    holders[b] += 1
            assert [m.ref_count(b) for b in range(m.num_blocks)] == holders
            assert m.num_free_blocks == holders.count(0)  # free and used partition the pool
            st_ = m.stats()
            assert st_["blocks_used"] == m.num_blocks - holders.count(0)
            assert st_["blocks_saved_by_sharing"] == sum(max(h - 1, 0) for h in holders)
        for s, toks in self.tokens.items():  # every sequence reads back its own tokens
            slots = self.m.slot_mapping(s).tolist()
            assert [self.shadow.get(x) for x in slots] == toks
        if self.tokens:
            ids = self.seq_ids()
            for m in self.ms:
                slots, tables, lens = m.decode_metadata(ids)
                assert lens.tolist() == [len(self.tokens[s]) for s in ids]
                assert slots.tolist() == [int(m.slot_mapping(s)[-1]) for s in ids]
                for r, s in enumerate(ids):
                    t = tables[r].tolist()
                    n = len(m.block_table(s))
                    assert t[:n] == m.block_table(s) and all(x == -1 for x in t[n:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), num_blocks=st.integers(4, 24),
       block_size=st.sampled_from([1, 2, 4]), prefix=st.booleans())
def test_block_manager_properties(ops, num_blocks, block_size, prefix):
    d = Driver(num_blocks, block_size, prefix)
    for o in ops:
        d.step(o)
        d.check()
    for s in d.seq_ids():
        d.all("free", s)
    d.tokens.clear()
    d.check()
    for m in d.ms:
        assert m.num_free_blocks == m.num_blocks
