"""bench/gpu_check.sh, end to end at test size on the CPU: no part of the prepared GPU check waits for a GPU to
be found broken. Each part must write its results file, and each file must hold the numbers it is for."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
PARTS = ("environment", "kernel_tests", "sampling", "concat_bandwidth", "score_bandwidth", "reward_memory")
NUMBER = r"\d+(?:\.\d+)?"


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env={**os.environ, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=300)


def cpu_model() -> str:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return names[0] if names else ""


def test_every_part_runs_on_the_cpu_and_writes_its_numbers(tmp_path):
    result = run_check("--device", "cpu", "--small", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"cpu_small_{part}.txt" for part in (*PARTS, "summary"))
    text = {part: (tmp_path / f"cpu_small_{part}.txt").read_text() for part in (*PARTS, "summary")}

    assert re.search(rf"torch {NUMBER}", text["environment"])
    tally = re.search(r"(\d+) passed", text["kernel_tests"])
    assert tally and int(tally.group(1)) > 50 and "failed" not in text["kernel_tests"], text["kernel_tests"]
    speeds = re.search(rf"ours ({NUMBER}) it/s, diffusers ({NUMBER}) it/s, ours/diffusers ({NUMBER})x",
                       text["sampling"])
    assert speeds and all(float(value) > 0 for value in speeds.groups()), text["sampling"]
    for part in ("concat_bandwidth", "score_bandwidth"):
        assert re.search(rf"summary: .* {NUMBER} GB/s = \d+% of a plain copy \({NUMBER} GB/s\)", text[part]), text[part]
    assert re.search(rf"n/a on CPU.*peak RSS {NUMBER} GB", text["reward_memory"]), text["reward_memory"]

    summary = text["summary"]
    assert cpu_model() in summary.splitlines()[1]  # the machine is named (line 0 is blank)
    for part in PARTS:
        assert re.search(rf"^{part} +{NUMBER}  \S", summary, re.MULTILINE), summary  # its seconds and its result
    assert re.search(rf"^total +{NUMBER}", summary, re.MULTILINE)
    assert "(kernels interpreted)" in summary


def test_a_failing_part_stops_the_check_and_is_named(tmp_path):
    result = run_check("--device", "cuda", "--results", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 1
    assert "part 'environment' failed" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_environment.txt", "gpu_summary.txt"]
    assert "sees no CUDA GPU" in (tmp_path / "gpu_environment.txt").read_text()
    summary = (tmp_path / "gpu_summary.txt").read_text()
    assert re.search(r"^environment +[\d.]+  FAILED", summary, re.MULTILINE) and "kernel_tests" not in summary


def test_parts_runs_only_the_named_ones(tmp_path):
    result = run_check("--device", "cpu", "--small", "--parts", "score_bandwidth", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "cpu_small_environment.txt", "cpu_small_score_bandwidth.txt", "cpu_small_summary.txt"]


def test_bad_options_get_one_line_errors(tmp_path):
    for args, message in ((["--device", "tpu"], "--device must be cuda or cpu"),
                          (["--parts", "speed"], "unknown part 'speed'"),
                          (["--fast"], "unknown option '--fast'")):
        result = run_check(*args, "--results", str(tmp_path))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
