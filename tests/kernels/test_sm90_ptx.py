"""The GPU-only side of the decode kernels, compiled for an H100 (sm_90) without one.

Programmatic dependent launch and the L2 warm-up exist only on the GPU: the CPU interpreter never runs
them. Triton compiles ahead of time for a target it is told (its bundled ptxas included), so here the
one-row int4 and fp8 GEMVs (with each warm-up), the RMSNorm, the few-row int4 and int8 GEMVs and the
decode attention are compiled for sm_90 with each PDL setting, and the PTX is read: every variant
compiles; nothing is loaded or stored before `griddepcontrol.wait`; the warm-up's L2 prefetches come
before it; under USE_PDL 1 the next kernel is released right after the wait, under USE_PDL 2
(KILN_PDL=late) only after the kernel's loads have begun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

MEMORY = ("ld.global", "st.global", "atom.global", "red.global")
INT4_TYPES = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32",
                  count_ptr="*i32")
FP8_TYPES = dict(xq_ptr="*fp8e4nv", sx_ptr="*fp32", w_ptr="*fp8e4nv", sw_ptr="*fp32", out_ptr="*bf16",
                 part_ptr="*fp32", count_ptr="*i32")
NORM_TYPES = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", xq_ptr="*fp8e4nv",
                  sx_ptr="*fp32", eps="fp32")
INT4 = dict(GROUP_WORDS=16, BLOCK_N=128, CW=16, PREFETCH=False, FUSED_SPLITS=True, GATED=True)
FP8 = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=512, FUSED_SPLITS=True)
NORM = dict(HAS_RESIDUAL=True, QUANT_FP8=True, BLOCK=4096)

# (name, module, kernel, argument types, constants): compiled in one process without the interpreter
CASES = (
    [(f"int4-{u}-{w}", "int4_matmul", "_int4_gemv1_kernel", INT4_TYPES, dict(INT4, WARM=w, USE_PDL=u))
     for u in (0, 1, 2) for w in (0, 1, 2)]
    + [(f"fp8-{u}-{w}", "fp8_matmul", "_fp8_gemv_kernel", FP8_TYPES, dict(FP8, WARM=w, USE_PDL=u))
       for u in (1, 2) for w in (0, 1, 2)]
    + [("norm-1", "rmsnorm", "_rms_norm_kernel", NORM_TYPES, dict(NORM, USE_PDL=1))]
    # the other kernels launched with late=True: a few rows' int4 and int8 GEMVs, the decode attention
    + [(f"{name}-{u}", module, kernel, types, dict(constants, USE_PDL=u)) for u in (1, 2)
       for name, module, kernel, types, constants in (
           ("int4rows", "int4_matmul", "_int4_gemv_kernel",
            dict(xw_ptr="*i32", qw_ptr="*u8", s_ptr="*bf16", z_ptr="*u8", out_ptr="*bf16"),
            dict(X_BF16=True, GROUP_PAIRS=64, BLOCK_M=4, BLOCK_N=64, BLOCK_KH=64, CHUNK=64)),
           ("int8rows", "int8_matmul", "_int8_gemv_kernel",
            dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*bf16", out_ptr="*bf16"),
            dict(GROUP=128, BLOCK_M=4, BLOCK_N=64, BLOCK_K=128, CHUNK=128)),
           ("decode", "decode_attention", "_decode_kernel",
            dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32",
                 out_ptr="*bf16", part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", qk_scale="fp32"),
            dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, TILE_N=64, HAS_WINDOW=False,
                 SPLIT=True, DOT_PRECISION="tf32")),
       )]
)

COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kiln.kernels import pdl
    if pdl.gdc_wait is None:
        print(json.dumps({"skip": "this Triton has no grid dependency control"})); sys.exit()
    out = {}
    for name, module, kernel, types, constants in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module("kiln.kernels." + module), kernel)
        names = fn.arg_names
        signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        out[name] = compiled.asm["ptx"].splitlines()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[str]]:
    """PTX lines of every case, for sm_90 (one process: the tests run with Triton's interpreter on)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(CASES), capture_output=True,
                         text=True, env=env, timeout=600)
    if run.returncode and "ptxas" in run.stderr:
        pytest.skip(f"no ptxas for sm_90 here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def first(lines: list[str], *patterns: str) -> int | None:
    return next((i for i, line in enumerate(lines) if any(p in line for p in patterns)), None)


def check_pdl(lines: list[str], use_pdl: int, warm: int) -> None:
    wait = first(lines, "griddepcontrol.wait")
    memory = first(lines, *MEMORY)
    release = first(lines, "griddepcontrol.launch_dependents")
    prefetch = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
    assert wait is not None and memory is not None and wait < memory, "memory touched before the wait"
    assert release is not None, "the next kernel is never released"
    if use_pdl == 1:
        assert wait < release < memory, "USE_PDL 1 releases the next kernel right after the wait"
    else:
        assert release > memory, "USE_PDL 2 releases the next kernel only after its loads began"
    assert bool(prefetch) == (warm > 0)
    assert all(i < wait for i in prefetch), "the warm-up prefetches after the wait"


@pytest.mark.parametrize("use_pdl", [1, 2])
@pytest.mark.parametrize("warm", [0, 1, 2])
def test_int4_gemv1_for_sm90(compiled, use_pdl: int, warm: int) -> None:
    check_pdl(compiled[f"int4-{use_pdl}-{warm}"], use_pdl, warm)


@pytest.mark.parametrize("use_pdl", [1, 2])
@pytest.mark.parametrize("warm", [0, 1, 2])
def test_fp8_gemv_for_sm90(compiled, use_pdl: int, warm: int) -> None:
    check_pdl(compiled[f"fp8-{use_pdl}-{warm}"], use_pdl, warm)


def test_rms_norm_for_sm90(compiled) -> None:
    check_pdl(compiled["norm-1"], 1, 0)


@pytest.mark.parametrize("warm", [0, 1, 2])
def test_without_pdl_there_is_no_grid_dependency_control(compiled, warm: int) -> None:
    assert first(compiled[f"int4-0-{warm}"], "griddepcontrol", "prefetch.global.L2") is None


@pytest.mark.parametrize("use_pdl", [1, 2])
@pytest.mark.parametrize("name", ["int4rows", "int8rows", "decode"])
def test_other_late_kernels_for_sm90(compiled, name: str, use_pdl: int) -> None:
    check_pdl(compiled[f"{name}-{use_pdl}"], use_pdl, 0)
