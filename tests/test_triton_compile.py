"""GPU build check without a GPU (DESIGN.md §3): every Triton kernel of grpo_fast.kernels, in
every config its launcher can pick, compiles to PTX and cubin for sm_75/80/86/89/90/120, and its
shared memory fits the arch's per-block limit.

The kernels must be real JITFunctions, but tests/conftest.py sets TRITON_INTERPRET=1 on this
machine, which makes @triton.jit return interpreter objects. So the compiling runs in child
processes started with TRITON_INTERPRET removed (this file is also the child's script), and a
fresh Triton cache dir, so a cache hit from an older run cannot stand in for a compile. Two
children share the six archs (CI has 2 cores). Run `python tests/test_triton_compile.py 86
--full` to also build every dtype x flag combination for one arch.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

CAPS = (75, 80, 86, 89, 90, 120)
# Per-block shared memory limits (opt-in maximum), from the CUDA C programming guide.
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              120: 99 * 1024}


def compile_caps(caps, full=False):
    """Child side: compile every spec for `caps`; one JSON line per spec on stdout."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from grpo_fast.kernels.logprob_specs import iter_specs

    for cap in caps:
        for spec in iter_specs(cap, full=full):
            rec = dict(cap=cap, name=spec["name"], jit=isinstance(spec["fn"], JITFunction))
            t0 = time.time()
            try:
                src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                                constexprs=spec["constexprs"], attrs=spec["attrs"])
                k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=spec["options"])
                rec.update(ok=True, shared=k.metadata.shared,
                           ptx=f".target sm_{cap}" in k.asm.get("ptx", ""),
                           cubin=len(k.asm.get("cubin", b"")))
            except Exception as err:  # reported, and failed, by the parent
                rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:2000]}")
            rec["seconds"] = round(time.time() - t0, 2)
            print(json.dumps(rec), flush=True)


@pytest.fixture(scope="module")
def compiled():
    """{cap: [records]} from two child processes, each compiling half of the archs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (silences a warning)
    groups = (CAPS[0::2], CAPS[1::2])
    with tempfile.TemporaryDirectory() as cache:
        procs = []
        for i, caps in enumerate(groups):
            child_env = dict(env, TRITON_CACHE_DIR=os.path.join(cache, str(i)))
            procs.append(subprocess.Popen(
                [sys.executable, __file__, ",".join(map(str, caps))], env=child_env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900) for p in procs]
    results = {cap: [] for cap in CAPS}
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
        for line in out.splitlines():
            rec = json.loads(line)
            results[rec["cap"]].append(rec)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPS)
def test_kernels_compile_for_arch(compiled, cap):
    from grpo_fast.kernels._config import KINDS, SMEM_LIMIT_BYTES, configs_for

    assert SMEM_LIMIT_BYTES[cap] == SMEM_LIMIT[cap]  # the launcher's table agrees with the guide
    recs = compiled[cap]
    # every (kind, config, operand size) the launcher can pick for this arch was built
    expected = sum(len(configs_for(kind, cap, eb)) * (1 if eb == 2 else 2)  # fp32: ieee + tf32
                   for kind in KINDS for eb in (2, 4))
    assert len(recs) == expected
    failed = [f"{r['name']}: {r['error']}" for r in recs if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in recs:
        assert r["jit"], f"{r['name']} was not a JITFunction (interpreter leaked into the child)"
        assert r["ptx"] and r["cubin"] > 0, f"{r['name']}: no PTX/cubin for sm_{cap}"
        assert 0 < r["shared"] <= SMEM_LIMIT[cap], \
            f"{r['name']}: {r['shared']} B shared > sm_{cap} limit {SMEM_LIMIT[cap]} B"


if __name__ == "__main__":
    compile_caps([int(c) for c in sys.argv[1].split(",")], full="--full" in sys.argv)
