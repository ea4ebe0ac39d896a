"""`kiln doctor`: the CPU-only machine the tests run on, tiny engines of one and two ranks, and the GPU
judgements (dtype, fp8, memory, ranks, Triton) on described machines, since `engine_checks` judges a
`Machine` and not the hardware it runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.doctor import GIB, Check, Gpu, Machine, parse_smi_cuda, parse_smi_query, run_doctor

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, 78 * GIB)
A100 = Gpu(0, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB, 79 * GIB)
T4 = Gpu(0, "Tesla T4", (7, 5), 15 * GIB, 14 * GIB)
SMI_QUERY = "0, NVIDIA H100 80GB HBM3, 550.54.15\n1, NVIDIA H100 80GB HBM3, 550.54.15\n"
SMI_TABLE = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kiln", "doctor", *args], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def checks(report_json: dict, status: str | None = None) -> dict[str, dict]:
    return {c["name"]: c for c in report_json["checks"] if status is None or c["status"] == status}


def by_name(report_checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in report_checks}


# ---- engines ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny random Llama built for the CPU, with one rank and with two."""
    from kiln.builder.build import build_engine
    from kiln.checkpoint.convert import convert_hf
    from kiln.config import BuildConfig

    tmp = tmp_path_factory.mktemp("doctor")
    limits = BuildConfig(max_batch_size=2, max_input_len=64, max_seq_len=128, max_num_tokens=128, tokens_per_block=16)
    built = {}
    for tp in (1, 2):
        ckpt = convert_hf(tiny_llama_hf, tmp / f"ckpt-tp{tp}", "float32", tp)
        build_engine(ckpt, tmp / f"engine-tp{tp}", limits, "cpu")
        built[tp] = tmp / f"engine-tp{tp}"
    return built


def variant(engine: Path, folder: Path, **changes) -> Path:
    """A copy of `engine` whose engine.json says something else (device, dtype, quantization, versions)."""
    shutil.copytree(engine, folder)
    data = json.loads((folder / "engine.json").read_text())
    data.update(changes)
    (folder / "engine.json").write_text(json.dumps(data))
    return folder


def gpu_machine(*gpus: Gpu, probe: tuple[bool, str] = (True, "ran"), **fields) -> Machine:
    return Machine(python="3.11.7", kiln=kiln.__version__, torch=torch.__version__, torch_cuda="12.4",
                   triton="3.2.0", gpus=gpus, driver="550.54.15", driver_cuda="12.4", smi_gpus=len(gpus),
                   cpu_count=16, ram_available_bytes=100 * GIB, triton_probe=probe, **fields)


def cuda_desc(gpu: Gpu) -> dict:
    return {"type": "cuda", "name": gpu.name, "compute_capability": "{}.{}".format(*gpu.compute_capability),
            "total_memory_gib": round(gpu.total_bytes / GIB, 1)}


@pytest.fixture
def this_gpu(monkeypatch: pytest.MonkeyPatch):
    """Make the engine loader's device check see `gpu` as this machine's CUDA device."""
    def use(gpu: Gpu) -> None:
        import kiln.builder.device as device

        monkeypatch.setattr(device, "describe_device", lambda d: cuda_desc(gpu) if d.startswith("cuda") else
                            {"type": "cpu", "name": "x86_64"})
    return use


# ---- this machine ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU is told")
def test_a_cpu_only_machine_is_told_so_clearly():
    text = doctor()
    assert text.returncode == 0, text.stderr
    assert "no NVIDIA GPU found: kiln runs on the CPU, slowly" in text.stdout
    assert "no GPU: Triton kernels not used, CPU reference path runs (slow)" in text.stdout
    assert f"kiln          {kiln.__version__}" in text.stdout and torch.__version__ in text.stdout

    report = json.loads(doctor("--json").stdout)
    assert report["ok"] is True and report["machine"]["gpus"] == [] and report["machine"]["device"] == "cpu"
    assert checks(report)["gpu"]["status"] == "WARN"
    assert "CPU" in report["verdict"]


@pytest.mark.gpu
def test_a_gpu_machine_compiles_a_triton_kernel():
    proc = doctor("--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], proc.stdout
    assert len(report["machine"]["gpus"]) == torch.cuda.device_count()
    assert report["machine"]["driver"] and report["machine"]["torch_cuda"]
    assert checks(report)["kernels"]["status"] == "OK", checks(report)["kernels"]


def test_a_cpu_engine_can_run_on_the_cpu(engines):
    if torch.cuda.is_available():
        pytest.skip("a CPU engine on a GPU machine is refused (tested below)")
    proc = doctor("--engine_dir", str(engines[1]), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], proc.stdout
    engine = [c for c in report["checks"] if c["section"].startswith("Engine")]
    assert {c["name"] for c in engine} >= {"engine", "device", "ranks", "format", "memory", "versions"}
    assert all(c["status"] == "OK" for c in engine), engine
    assert report["verdict"] == f"engine {engines[1]} can run here on the CPU (slowly: no NVIDIA GPU)"


def test_an_engine_built_for_a_gpu_cannot_run_on_the_cpu(engines, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu_engine = variant(engines[1], tmp_path / "h100", device=cuda_desc(H100))
    proc = doctor("--engine_dir", str(gpu_engine))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    device = next(line for line in proc.stdout.splitlines() if "device" in line)
    assert device.split()[0] == "FAIL" and "NVIDIA H100" in device and "rebuild it here" in device
    assert f"Result: engine {gpu_engine} cannot run here: device: " in proc.stdout


# ---- engines on described machines -----------------------------------------------------------------
CPU = Machine(python="3.11.7", kiln=kiln.__version__, torch=torch.__version__, torch_cuda=None, triton=None,
              cpu_count=2, ram_available_bytes=8 * GIB)


def test_two_ranks_run_as_two_cpu_processes_or_need_two_gpus(engines, this_gpu, tmp_path):
    ranks = by_name(run_doctor(engines[2], CPU).checks)["ranks"]
    assert ranks.status == "WARN" and "2 processes" in ranks.detail and "gloo" in ranks.detail

    this_gpu(H100)
    gpu_engine = variant(engines[2], tmp_path / "tp2", device=cuda_desc(H100))
    report = run_doctor(gpu_engine, gpu_machine(H100))
    assert not report.ok
    ranks = by_name(report.checks)["ranks"]
    assert ranks.status == "FAIL" and "tp_size 2 needs 2 GPUs" in ranks.detail and "has 1" in ranks.detail
    assert report.verdict().startswith(f"engine {gpu_engine} cannot run here: ranks: tp_size 2")
    two = gpu_machine(H100, Gpu(1, H100.name, (9, 0), 80 * GIB, 78 * GIB))
    assert run_doctor(gpu_engine, two).ok


@pytest.mark.parametrize("gpu, dtype, algo, failing", [
    (T4, "bfloat16", None, "dtype"),  # bfloat16 needs 8.0
    (A100, "bfloat16", None, None),
    (A100, "float16", "fp8", "quantization"),  # fp8 needs 8.9
    (H100, "bfloat16", "fp8", None),
    (T4, "float16", "int4_awq", None),
])
def test_dtype_and_quantization_against_compute_capability(engines, this_gpu, tmp_path, gpu, dtype, algo, failing):
    this_gpu(gpu)
    engine = variant(engines[1], tmp_path / "e", device=cuda_desc(gpu), dtype=dtype,
                     quantization={"quant_algo": algo, "group_size": 128 if algo else 0})
    report = run_doctor(engine, gpu_machine(gpu))
    fails = [c.name for c in report.checks if c.status == "FAIL"]
    assert fails == ([failing] if failing else []), report.format_text()
    if failing:
        assert "{}.{}".format(*gpu.compute_capability) in by_name(report.checks)[failing].detail


def test_too_little_free_gpu_memory_fails(engines, this_gpu, tmp_path):
    this_gpu(A100)
    engine = variant(engines[1], tmp_path / "e", device=cuda_desc(A100))
    report = run_doctor(engine, gpu_machine(A100))
    assert by_name(report.checks)["memory 0"].status == "OK"
    busy = Gpu(0, A100.name, (8, 0), 80 * GIB, 1 * GIB)  # the 2 GiB workspace alone does not fit
    memory = by_name(run_doctor(engine, gpu_machine(busy)).checks)["memory 0"]
    assert memory.status == "FAIL" and "not even one" in memory.detail and "--max_seq_len" in memory.detail


def test_another_gpu_model_warns_about_re_tuning(engines, this_gpu, tmp_path):
    this_gpu(A100)
    engine = variant(engines[1], tmp_path / "e", device=cuda_desc(H100))
    report = run_doctor(engine, gpu_machine(A100))
    device = by_name(report.checks)["device"]
    assert report.ok and device.status == "WARN" and "re-tuned" in device.detail and "A100" in device.detail


def test_triton_that_cannot_compile_fails_gpu_engines(engines, this_gpu, tmp_path):
    this_gpu(H100)
    engine = variant(engines[1], tmp_path / "e", device=cuda_desc(H100))
    machine = gpu_machine(H100, probe=(False, "CalledProcessError: ptxas exited 255"))
    report = run_doctor(engine, machine)
    fails = {(c.section, c.name) for c in report.checks if c.status == "FAIL"}
    assert fails == {("Triton", "kernels"), (f"Engine {engine}", "kernels")}
    alone = run_doctor(None, machine)  # without an engine: the machine itself fails
    assert not alone.ok and "ptxas" in by_name(alone.checks)["kernels"].detail


def test_version_mismatch_warns_and_a_damaged_engine_fails(engines, tmp_path):
    old = variant(engines[1], tmp_path / "old", versions={"kiln": "0.0.1", "torch": "2.6.0", "python": "3.11"})
    versions = by_name(run_doctor(old, CPU).checks)["versions"]
    assert versions.status == "WARN" and "kiln 0.0.1" in versions.detail and "torch 2.6.0" in versions.detail

    broken = variant(engines[2], tmp_path / "broken")
    (broken / "rank1.safetensors").unlink()
    report = run_doctor(broken, CPU)
    assert not report.ok
    assert [c.detail for c in report.checks if c.status == "FAIL"] == [
        f"--engine_dir {broken}: rank1.safetensors is missing; rebuild with `kiln build`"]


def test_an_engine_larger_than_the_memory_fails_on_the_cpu(engines):
    tiny = Machine(**{**CPU.__dict__, "ram_available_bytes": 1000})
    memory = by_name(run_doctor(engines[1], tiny).checks)["memory"]
    assert memory.status == "FAIL" and "more than the 0.0 MiB available" in memory.detail


# ---- the machine's own problems --------------------------------------------------------------------
def test_gpus_that_pytorch_cannot_use_are_explained():
    cpu_torch = Machine(python="3.11.7", kiln="0.1.0", torch="2.6.0+cpu", torch_cuda=None, triton=None,
                        driver="550.54.15", driver_cuda="12.4", smi_gpus=2)
    cuda = by_name(run_doctor(None, cpu_torch).checks)["cuda"]
    assert cuda.status == "FAIL" and "nvidia-smi lists 2 GPU(s)" in cuda.detail and "CPU-only build" in cuda.detail

    old_driver = Machine(**{**cpu_torch.__dict__, "torch": "2.6.0+cu124", "torch_cuda": "12.4",
                            "driver": "470.82", "driver_cuda": "11.4"})
    cuda = by_name(run_doctor(None, old_driver).checks)["cuda"]
    assert "supports CUDA up to 11.4 but torch was built for CUDA 12.4" in cuda.detail
    assert "update the NVIDIA driver" in cuda.detail


def test_nvidia_smi_output_is_parsed():
    assert parse_smi_query(SMI_QUERY) == {"count": 2, "driver": "550.54.15"}
    assert parse_smi_query("") == {"count": 0, "driver": None}
    assert parse_smi_query("0, NVIDIA A100, [N/A]\n") == {"count": 1, "driver": None}
    assert parse_smi_cuda(SMI_TABLE) == "12.4"
    assert parse_smi_cuda("No devices were found") is None
