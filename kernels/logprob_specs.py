"""Every (kernel, signature, constexprs, options) the log-prob launchers can produce on a GPU.

Used by tests/test_triton_compile.py to build each one with triton.compile for a given compute
capability without a GPU. Kept next to the launchers so that a new kernel argument or config
shows up here (the argument order must match the `kernel[grid](...)` calls in logprob.py).
"""
import itertools

from ._config import KINDS, configs_for
from .logprob_bwd import logprob_bwd_dh_kernel, logprob_bwd_dw_kernel
from .logprob_fwd import logprob_fwd_kernel

_TRITON_DTYPE = {2: ("bf16", "fp16"), 4: ("fp32",)}

KERNELS = {"fwd": logprob_fwd_kernel, "fwd_grad": logprob_fwd_kernel,
           "bwd_dh": logprob_bwd_dh_kernel, "bwd_dw": logprob_bwd_dw_kernel}


def _signature(kind: str, dt: str) -> dict:
    ptr = f"*{dt}"
    if kind in ("fwd", "fwd_grad"):
        args = [("h_ptr", ptr), ("w_ptr", ptr), ("b_ptr", ptr), ("y_ptr", "*i64"),
                ("part_ptr", "*fp32"), ("e_ptr", "*fp32"), ("N", "i32"), ("V", "i32"), ("H", "i32"),
                ("v_per_split", "i32"), ("pre", "fp32"), ("post", "fp32")]
    elif kind == "bwd_dh":
        args = [("h_ptr", ptr), ("w_ptr", ptr), ("b_ptr", ptr), ("y_ptr", "*i64"),
                ("lse_ptr", "*fp32"), ("g_ptr", "*fp32"), ("ent_ptr", "*fp32"), ("gent_ptr", "*fp32"),
                ("dh_ptr", "*fp32"), ("N", "i32"), ("V", "i32"), ("H", "i32"), ("v_per_split", "i32"),
                ("pre", "fp32"), ("post", "fp32")]
    else:
        args = [("h_ptr", ptr), ("w_ptr", ptr), ("b_ptr", ptr), ("y_ptr", "*i64"),
                ("lse_ptr", "*fp32"), ("g_ptr", "*fp32"), ("ent_ptr", "*fp32"), ("gent_ptr", "*fp32"),
                ("dw_ptr", "*fp32"), ("db_ptr", "*fp32"), ("N", "i32"), ("V", "i32"), ("H", "i32"),
                ("pre", "fp32"), ("post", "fp32")]
    return dict(args)


def _launch_attrs(fn, signature: dict) -> dict:
    """Divisibility hints as the JIT gives them at launch for real models: torch allocations
    are 16-byte aligned and H (576, 1536, 4096, ...) is a multiple of 16. With them Triton can
    use 16-byte async copies and pipeline the K loop, which is what costs shared memory."""
    hinted = [k for k, v in signature.items() if v.startswith("*") or k == "H"]
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}


def _flag_sets(kind: str):
    """The boolean constexpr combinations the launcher can pass (all of them), heaviest last."""
    if kind == "fwd":
        names = ("HAS_BIAS", "HAS_SOFTCAP", "COMPUTE_ENTROPY")
    elif kind == "fwd_grad":
        names = ("HAS_BIAS", "COMPUTE_ENTROPY")  # never with a soft cap
    elif kind == "bwd_dh":
        names = ("HAS_BIAS", "HAS_SOFTCAP", "ENTROPY_GRAD")
    else:
        names = ("HAS_BIAS", "HAS_SOFTCAP", "ENTROPY_GRAD", "NEED_DW", "NEED_DB")
    for values in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, values))
        if kind == "bwd_dw" and not (flags["NEED_DW"] or flags["NEED_DB"]):
            continue  # not launched
        if kind == "bwd_dw" and flags["NEED_DB"] and not flags["HAS_BIAS"]:
            continue  # rejected by the launcher
        if kind == "fwd_grad":
            flags["HAS_SOFTCAP"] = False
        yield flags


def iter_specs(cap: int, full: bool = False):
    """Yield dicts(name, fn, signature, constexprs, attrs, options) for compute capability `cap`.

    Every (kernel, config, operand size, dot precision) the launcher can pick for `cap` is
    covered. By default each is built once, with the heaviest flags (bias, soft cap, entropy and
    its gradient, dW and db on: the most registers and shared memory) and bf16 standing for fp16 (same sizes, same
    code path); full=True builds every dtype x flag combination too (about 4x slower).
    """
    for kind in KINDS:
        fn = KERNELS[kind]
        for elem_bytes, dts in _TRITON_DTYPE.items():
            for cfg in configs_for(kind, cap, elem_bytes):
                flag_sets = list(_flag_sets(kind))
                if not full:
                    flag_sets, dts = flag_sets[-1:], dts[:1]
                for dt, flags in itertools.product(dts, flag_sets):
                    precisions = ("ieee", "tf32") if dt == "fp32" else ("ieee",)
                    for precision in precisions:
                        if kind in ("fwd", "fwd_grad"):
                            flags = dict(flags, INPUT_GRAD=kind == "fwd_grad")
                        constexprs = dict(flags, UPCAST_DOT=False, DOT_PRECISION=precision,
                                          BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                                          BLOCK_K=cfg.block_k)
                        signature = _signature(kind, dt)
                        signature.update({k: "constexpr" for k in constexprs})
                        tag = ",".join(f"{k}={int(v)}" for k, v in flags.items())
                        yield dict(name=f"{kind}[{dt},{precision},{tag},{cfg}]", fn=fn,
                                   signature=signature, constexprs=constexprs,
                                   attrs=_launch_attrs(fn, signature),
                                   options=dict(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages))
