"""kiln doctor: what this machine offers kiln, and whether a given engine can run on it, with reasons.

Most failures to run an engine are facts about the machine that can be read before loading anything:
no GPU visible to PyTorch (a CPU build of torch, a driver older than torch's CUDA), too few GPUs for
the engine's ranks, a dtype or quantization format the GPU lacks (bfloat16 needs compute capability
8.0, fp8 needs 8.9), weights larger than the free memory, Triton unable to compile here. The doctor
gathers the facts once (`probe_machine`), then judges them (`machine_checks`, `engine_checks`) as pure
functions of those facts, so that each judgement is tested on any machine. Device-kind checks reuse
the engine loader's own (kiln.builder.device.check_runnable).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kiln
from kiln.errors import KilnError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GIB = 2**30
BF16_CC, FP8_CC = (8, 0), (8, 9)


@dataclass(frozen=True)
class Check:
    section: str
    status: str  # OK, WARN or FAIL
    name: str
    detail: str


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int | None = None


@dataclass(frozen=True)
class Machine:
    """What `probe_machine` read; every judgement is made from this alone."""

    python: str
    kiln: str
    torch: str
    torch_cuda: str | None  # the CUDA runtime torch was built with (None: a CPU build)
    triton: str | None
    gpus: tuple[Gpu, ...] = ()  # the GPUs PyTorch can use
    driver: str | None = None  # from nvidia-smi
    driver_cuda: str | None = None  # the newest CUDA the driver supports
    smi_gpus: int = 0  # GPUs nvidia-smi lists
    smi_error: str | None = None
    cpu_count: int = 1
    ram_available_bytes: int | None = None
    triton_interpret: bool = False
    triton_probe: tuple[bool, str] | None = None  # (ran and matched, what happened); None: not tried

    @property
    def device(self) -> str:
        return "cuda:0" if self.gpus else "cpu"


@dataclass
class Report:
    machine: Machine
    checks: list[Check] = field(default_factory=list)
    engine_dir: str | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        machine = dataclasses.asdict(self.machine)
        machine["device"] = self.machine.device
        return {"ok": self.ok, "engine_dir": self.engine_dir, "verdict": self.verdict(),
                "machine": machine, "checks": [dataclasses.asdict(c) for c in self.checks]}

    def verdict(self) -> str:
        fails = [f"{c.name}: {c.detail}" for c in self.checks if c.status == FAIL]
        if self.engine_dir is not None:
            if fails:
                return f"engine {self.engine_dir} cannot run here: " + "; ".join(fails)
            return f"engine {self.engine_dir} can run here on {_where(self.machine)}"
        if fails:
            return "kiln cannot use this machine as it is: " + "; ".join(fails)
        return f"kiln runs here on {_where(self.machine)}"

    def format_text(self) -> str:
        lines = ["kiln doctor"]
        section = None
        for c in self.checks:
            if c.section != section:
                section = c.section
                lines.append(section)
            lines.append(f"  {c.status:<4}  {c.name:<13} {c.detail}")
        lines.append(f"Result: {self.verdict()}")
        return "\n".join(lines)


def _where(m: Machine) -> str:
    if m.gpus:
        return f"{len(m.gpus)} GPU(s) ({', '.join(sorted({g.name for g in m.gpus}))})"
    return "the CPU (slowly: no NVIDIA GPU)"


# ---- probing ---------------------------------------------------------------------------------
def probe_machine(run_triton: bool = True) -> Machine:
    import torch

    smi = read_nvidia_smi()
    machine = Machine(
        python=platform.python_version(), kiln=kiln.__version__, torch=torch.__version__,
        torch_cuda=torch.version.cuda, triton=_version("triton"), gpus=_torch_gpus(),
        driver=smi.get("driver"), driver_cuda=smi.get("cuda"), smi_gpus=smi.get("count", 0),
        smi_error=smi.get("error"), cpu_count=os.cpu_count() or 1, ram_available_bytes=_ram_available(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "") not in ("", "0"),
    )
    if run_triton and machine.gpus and machine.triton:
        machine = dataclasses.replace(machine, triton_probe=probe_triton(machine.device))
    return machine


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _torch_gpus() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free = int(torch.cuda.mem_get_info(i)[0])
        except RuntimeError:
            free = None
        gpus.append(Gpu(i, props.name, (props.major, props.minor), int(props.total_memory), free))
    return tuple(gpus)


def _ram_available() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def read_nvidia_smi() -> dict[str, Any]:
    """{'driver', 'cuda', 'count'} from nvidia-smi, {'error': why} when it fails, {} when it is absent."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        query = subprocess.run([exe, "--query-gpu=index,name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        table = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi did not run ({e})"}
    if query.returncode != 0:
        why = (query.stdout + query.stderr).strip().splitlines()
        return {"error": why[0] if why else f"nvidia-smi exited {query.returncode}"}
    return {**parse_smi_query(query.stdout), "cuda": parse_smi_cuda(table.stdout)}


def parse_smi_query(text: str) -> dict[str, Any]:
    """`nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader` -> count and driver."""
    rows = [r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if len(r) >= 3]
    drivers = [r[2].strip() for r in rows if r[2].strip() and not r[2].strip().startswith("[")]
    return {"count": len(rows), "driver": drivers[0] if drivers else None}


def parse_smi_cuda(text: str) -> str | None:
    """The 'CUDA Version: 12.4' of nvidia-smi's table: the newest CUDA runtime the driver supports."""
    match = re.search(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)*)", text)
    return match.group(1) if match else None


def probe_triton(device: str) -> tuple[bool, str]:
    """Compile and run one of kiln's Triton kernels on `device`, against its PyTorch reference."""
    try:
        import torch

        from kiln.kernels import reference
        from kiln.kernels.activation import silu_and_mul

        x = torch.randn(8, 512, device=device, dtype=torch.float16)
        start = time.perf_counter()
        y = silu_and_mul(x)
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        expected = reference.silu_and_mul(x.float())
        if not torch.allclose(y.float(), expected, atol=2e-2, rtol=2e-2):
            return False, "kiln's silu_and_mul kernel ran but its result differs from the PyTorch reference"
        return True, f"compiled and ran kiln's silu_and_mul kernel on {device} in {elapsed:.1f} s; it matches"
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"{type(e).__name__}: {first}"[:300]


# ---- the machine -------------------------------------------------------------------------------
def machine_checks(m: Machine) -> list[Check]:
    return _software_checks(m) + _gpu_checks(m) + [_triton_check(m)]


def _software_checks(m: Machine) -> list[Check]:
    s = "Software"
    py = tuple(int(p) for p in m.python.split(".")[:2])
    checks = [
        Check(s, OK if py >= (3, 10) else FAIL, "python", m.python + ("" if py >= (3, 10) else ": kiln needs 3.10+")),
        Check(s, OK, "kiln", m.kiln),
        Check(s, OK, "torch", f"{m.torch} (CUDA {m.torch_cuda})" if m.torch_cuda else f"{m.torch} (CPU-only build)"),
    ]
    if m.triton:
        checks.append(Check(s, OK, "triton", m.triton))
    elif m.gpus:
        checks.append(Check(s, FAIL, "triton", "not installed, and kiln's GPU path runs Triton kernels: "
                                               "pip install triton"))
    else:
        checks.append(Check(s, OK, "triton", "not installed (only the GPU path needs it)"))
    ram = f", {m.ram_available_bytes / GIB:.1f} GiB of memory available" if m.ram_available_bytes else ""
    checks.append(Check(s, OK, "cpu", f"{m.cpu_count} cores{ram}"))
    return checks


def _gpu_checks(m: Machine) -> list[Check]:
    s = "GPU"
    if not m.gpus:
        if m.smi_gpus:
            return [Check(s, FAIL, "cuda", f"nvidia-smi lists {m.smi_gpus} GPU(s) but PyTorch cannot use them: "
                                           + _why_no_cuda(m))]
        seen = f" ({m.smi_error})" if m.smi_error else ""
        return [Check(s, WARN, "gpu", f"no NVIDIA GPU found{seen}: kiln runs on the CPU, slowly (PyTorch "
                                      "reference path); engines built here are CPU engines")]
    checks = [Check(s, OK, "cuda", f"PyTorch sees {len(m.gpus)} GPU(s); CUDA runtime {m.torch_cuda}")]
    if m.driver:
        checks.append(Check(s, OK, "driver", f"{m.driver} (supports CUDA up to {m.driver_cuda or '?'})"))
    else:
        checks.append(Check(s, WARN, "driver", f"unknown: {m.smi_error or 'nvidia-smi not found'}"))
    for g in m.gpus:
        free = f", {g.free_bytes / GIB:.1f} GiB free" if g.free_bytes is not None else ""
        cc = "{}.{}".format(*g.compute_capability)
        status, note = OK, ""
        if g.compute_capability < BF16_CC:
            status, note = WARN, ": below 8.0, no bfloat16 (build float16 engines)"
        checks.append(Check(s, status, f"gpu {g.index}", f"{g.name}, compute capability {cc}, "
                                                          f"{g.total_bytes / GIB:.1f} GiB{free}{note}"))
    return checks


def _why_no_cuda(m: Machine) -> str:
    if not m.torch_cuda:
        return f"torch {m.torch} is a CPU-only build: install a CUDA build of torch"
    if m.driver_cuda and _version_tuple(m.driver_cuda) < _version_tuple(m.torch_cuda)[:2]:
        return (f"the driver ({m.driver}) supports CUDA up to {m.driver_cuda} but torch was built for CUDA "
                f"{m.torch_cuda}: update the NVIDIA driver or install a torch built for an older CUDA")
    return "check CUDA_VISIBLE_DEVICES and that the driver loads (a container needs --gpus all)"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def _triton_check(m: Machine) -> Check:
    s = "Triton"
    if not m.gpus:
        return Check(s, WARN, "kernels", "no GPU: Triton kernels not used, CPU reference path runs (slow)")
    if m.triton_interpret:
        return Check(s, WARN, "kernels", "TRITON_INTERPRET is set: kernels run in Triton's interpreter, "
                                         "very slowly; unset it")
    if m.triton_probe is None:
        return Check(s, WARN if m.triton else FAIL, "kernels", "not tried" if m.triton else "triton missing")
    ran, what = m.triton_probe
    return Check(s, OK if ran else FAIL, "kernels", what if ran else f"cannot compile and run a kernel here: {what}")


# ---- an engine ---------------------------------------------------------------------------------
def engine_checks(engine_dir: str | Path, m: Machine) -> list[Check]:
    """Whether the engine in `engine_dir` can run on machine `m`, one check per reason."""
    from kiln.builder.engine_file import load_engine_config

    s = f"Engine {engine_dir}"
    try:
        cfg = load_engine_config(engine_dir)
    except KilnError as e:
        return [Check(s, FAIL, "engine", str(e))]
    quant = cfg.quantization.get("quant_algo") or "no quantization"
    checks = [Check(s, OK, "engine", f"{cfg.model.architecture}, {cfg.model.num_layers} layers, {cfg.dtype}, "
                                     f"{quant}, tp_size {cfg.tp_size}")]
    checks += [_device_check(s, cfg, m, str(engine_dir)), _ranks_check(s, cfg, m)]
    checks += _format_checks(s, cfg, m)
    checks += _memory_checks(s, cfg, m, Path(engine_dir))
    checks += _version_checks(s, cfg, m)
    return checks


def _device_check(s: str, cfg: Any, m: Machine, engine_dir: str) -> Check:
    """The loader's own test (check_runnable): its refusal is a FAIL, its re-tuning note a WARN."""
    from kiln.builder.device import _name, check_runnable

    note = io.StringIO()
    try:
        with contextlib.redirect_stdout(note):
            check_runnable(cfg.device, m.device, engine_dir)
    except KilnError as e:
        return Check(s, FAIL, "device", str(e))
    said = note.getvalue().strip()
    if said:
        return Check(s, WARN, "device", said.removeprefix("note: "))
    return Check(s, OK, "device", f"built for {_name(cfg.device)}, as this machine")


def _ranks_check(s: str, cfg: Any, m: Machine) -> Check:
    n = cfg.tp_size
    if m.gpus:
        if n > len(m.gpus):
            return Check(s, FAIL, "ranks", f"tp_size {n} needs {n} GPUs, one per rank; this machine has "
                                           f"{len(m.gpus)}: run it where there are {n}, or convert and build "
                                           f"again with --tp_size {len(m.gpus)}")
        return Check(s, OK, "ranks", "one rank, on GPU 0" if n == 1 else f"{n} ranks, on GPUs 0-{n - 1}")
    if n > 1:
        return Check(s, WARN, "ranks", f"tp_size {n} on the CPU: kiln starts {n} processes that exchange "
                                       "activations over gloo (slow; fine for tests)")
    return Check(s, OK, "ranks", "one rank, on the CPU")


def _format_checks(s: str, cfg: Any, m: Machine) -> list[Check]:
    algo = cfg.quantization.get("quant_algo")
    gpus = m.gpus[: cfg.tp_size]
    if not gpus:
        what = f"{algo} weights dequantized by the CPU reference path" if algo else "full precision"
        return [Check(s, OK, "format", f"{cfg.dtype}, {what}: runs on the CPU")]
    checks = []
    oldest = min(gpus, key=lambda g: g.compute_capability)
    cc = "{}.{}".format(*oldest.compute_capability)
    if cfg.dtype == "bfloat16" and oldest.compute_capability < BF16_CC:
        checks.append(Check(s, FAIL, "dtype", f"bfloat16 needs compute capability 8.0 or newer; GPU "
                                              f"{oldest.index} ({oldest.name}) is {cc}: convert with --dtype "
                                              "float16 and build again"))
    else:
        checks.append(Check(s, OK, "dtype", f"{cfg.dtype} on compute capability {cc}"))
    if algo == "fp8" and oldest.compute_capability < FP8_CC:
        checks.append(Check(s, FAIL, "quantization", f"fp8 needs fp8 tensor cores (compute capability 8.9 or "
                                                     f"newer); GPU {oldest.index} ({oldest.name}) is {cc}: "
                                                     "quantize to int8_wo or int4_awq instead"))
    elif algo:
        checks.append(Check(s, OK, "quantization", f"{algo} runs on compute capability {cc}"))
    if not m.triton or (m.triton_probe is not None and not m.triton_probe[0]):
        checks.append(Check(s, FAIL, "kernels", "kiln's GPU path runs Triton kernels, which do not work here "
                                                "(see Triton above)"))
    return checks


def _memory_checks(s: str, cfg: Any, m: Machine, folder: Path) -> list[Check]:
    from kiln.runtime.memory import _WORKSPACE_BYTES, DEFAULT_GPU_FRACTION, activation_bytes, block_bytes

    weights = [(folder / f"rank{r}.safetensors").stat().st_size for r in range(cfg.tp_size)]
    b = cfg.build
    seq_bytes = -(-b.max_seq_len // b.tokens_per_block) * block_bytes(cfg)  # one max_seq_len sequence
    if not m.gpus:
        need = sum(weights) + cfg.tp_size * (b.max_batch_size * seq_bytes + activation_bytes(cfg))
        have = m.ram_available_bytes
        detail = f"needs about {_size(need)} (weights {_size(sum(weights))}, the rest KV cache and activations)"
        if have is None:
            return [Check(s, WARN, "memory", f"{detail}; available memory unknown")]
        if need > have:
            return [Check(s, FAIL, "memory", f"{detail}, more than the {_size(have)} available: free memory, "
                                             "or use a machine with more")]
        return [Check(s, OK, "memory", f"{detail} of {_size(have)} available")]
    checks = []
    for rank, (w, g) in enumerate(zip(weights, m.gpus)):
        if g.free_bytes is None:
            checks.append(Check(s, WARN, f"memory {rank}", f"GPU {g.index}: free memory unknown"))
            continue
        room = (g.free_bytes - w - activation_bytes(cfg) - _WORKSPACE_BYTES) * DEFAULT_GPU_FRACTION
        seqs = max(0, int(room // seq_bytes))
        detail = (f"rank {rank} on GPU {g.index}: weights {_size(w)} of {_size(g.free_bytes)} free; "
                  f"KV cache room for about {seqs} sequences of max_seq_len {b.max_seq_len}")
        if seqs < 1:
            checks.append(Check(s, FAIL, f"memory {rank}", f"{detail}: not even one; free GPU memory, use more "
                                                           "ranks (--tp_size), quantize, or lower --max_seq_len"))
        elif seqs < b.max_batch_size:
            checks.append(Check(s, WARN, f"memory {rank}", f"{detail}, fewer than max_batch_size {b.max_batch_size}"))
        else:
            checks.append(Check(s, OK, f"memory {rank}", detail))
    return checks


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _version_checks(s: str, cfg: Any, m: Machine) -> list[Check]:
    built = cfg.versions
    mismatches = [f"{what} {built[what]} (this is {here})" for what, here in (("kiln", m.kiln), ("torch", m.torch))
                  if built.get(what) and built[what] != here]
    if mismatches:
        return [Check(s, WARN, "versions", "built with " + " and ".join(mismatches) + ": if loading or results "
                                           "go wrong, build the engine again here")]
    return [Check(s, OK, "versions", f"built with kiln {built.get('kiln', '?')}, torch {built.get('torch', '?')}")]


def run_doctor(engine_dir: str | Path | None = None, machine: Machine | None = None) -> Report:
    machine = machine or probe_machine()
    report = Report(machine, machine_checks(machine), None if engine_dir is None else str(engine_dir))
    if engine_dir is not None:
        report.checks += engine_checks(engine_dir, machine)
    return report
