"""The launch scripts, with stand-ins for gcloud, srun, scontrol and llava_jax.main.

Nothing trains here: fake tools record their arguments, a fake main module records its
environment, and the tests check what each script would have run and with what.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "gpu_slurm.sh"
LOCAL = LAUNCH / "local_multiprocess.sh"
SCRIPTS = [TPU, SLURM, LOCAL]

# Overrides that a careless `eval` or missing quote would mangle.
TRICKY = [
    "--config.train.num_steps=7",
    "--config.name=two words",
    '--config.note=it\'s "quoted"',
    "--config.path=$HOME/*; echo pwned",
]

# Records each call as one JSON line: tool name, argv and the coordinator seen.
FAKE_TOOL = """#!{python}
import json, os, shutil, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as f:
    env = {{"LLAVA_COORDINATOR_ADDRESS": os.environ.get("LLAVA_COORDINATOR_ADDRESS")}}
    f.write(json.dumps({{"tool": name, "argv": sys.argv[1:], "env": env}}) + "\\n")
"""

FAKE_GCLOUD = (
    FAKE_TOOL
    + """
if "scp" in sys.argv:
    shutil.copy(sys.argv[sys.argv.index("scp") + 1], os.environ["FAKE_SCP_COPY"])
"""
)

# Runs the task command once per task, as srun would on each node.
FAKE_SRUN = (
    FAKE_TOOL
    + """
import subprocess
args = sys.argv[1:]
ntasks = 1
while args[0].startswith("-"):
    if args[0].startswith("--ntasks="):
        ntasks = int(args[0].split("=", 1)[1])
    args = args[1:]
codes = []
for i in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_NTASKS=str(ntasks))
    codes.append(subprocess.run(args, env=env).returncode)
sys.exit(max(codes))
"""
)

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_LOG.scontrol"
printf '%s\\n' gpu-07 gpu-08
"""

# Stand-in for llava_jax.main: records its environment and arguments, then behaves as
# FAKE_MODE says: ok (exit 0), fail (process 1 exits 3, the others wait), sleep.
FAKE_MAIN = """
import json, os, signal, sys, time

pid = os.environ["LLAVA_PROCESS_ID"]
out = os.environ["FAKE_OUT"]
mode = os.environ.get("FAKE_MODE", "ok")


def on_term(*_):
    open(os.path.join(out, f"term_{pid}"), "w").close()
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
names = ["LLAVA_PROCESS_ID", "LLAVA_NUM_PROCESSES", "LLAVA_COORDINATOR_ADDRESS", "XLA_FLAGS",
         "JAX_PLATFORMS", "LLAVA_CPU_COLLECTIVES"]
record = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in names},
          "pid": os.getpid()}
with open(os.path.join(out, f"proc_{pid}.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(out, f"proc_{pid}.json.tmp"), os.path.join(out, f"proc_{pid}.json"))
print(f"hello from process {pid}", flush=True)
if mode == "fail" and pid == "1":
    # Fail only once every process is up with its SIGTERM handler (each writes its record
    # after installing it); failing earlier raced a slow start of the others under load.
    count = int(os.environ["LLAVA_NUM_PROCESSES"])
    deadline = time.time() + 15
    while time.time() < deadline and not all(
        os.path.exists(os.path.join(out, f"proc_{i}.json")) for i in range(count)
    ):
        time.sleep(0.05)
    sys.exit(3)
if mode != "ok":
    time.sleep(30)
"""


@pytest.fixture
def fake(tmp_path):
    """A bin dir with fake tools first on PATH, a fake main module, and a clean env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
        path.chmod(0o755)
    (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLAVA_"))}
    env.pop("DRY_RUN", None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(tmp_path),
        PYTHON=sys.executable,
        LLAVA_MAIN_MODULE="fake_main",
        FAKE_LOG=str(tmp_path / "calls.jsonl"),
        FAKE_SCP_COPY=str(tmp_path / "scp_copy.tar.gz"),
        FAKE_OUT=str(out),
    )

    class Fake:
        path = tmp_path
        environ = env
        out_dir = out

        @staticmethod
        def calls():
            log = tmp_path / "calls.jsonl"
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        @staticmethod
        def procs():
            return {int(p.name[5:-5]): json.loads(p.read_text()) for p in out.glob("proc_*.json")}

    return Fake


def run(script, *args, env=None, timeout=20):
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- help and argument checking ---------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(script, flag):
    result = run(script, flag)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "Example" in result.stdout or "sbatch" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


TPU_ID = ["--name", "my-tpu", "--zone", "us-central2-b"]
BAD_ARGS = [
    (TPU, [], "missing COMMAND"),
    (TPU, ["frobnicate", *TPU_ID], "unknown command 'frobnicate'"),
    (TPU, ["create", "--zone", "z"], "missing --name"),
    (TPU, ["create", "--name", "my-tpu"], "missing --zone"),
    (TPU, ["create", *TPU_ID, "--bogus"], "unknown option '--bogus'"),
    (TPU, ["create", *TPU_ID, "extra"], "unexpected argument 'extra'"),
    (TPU, ["create", "--zone", "z", "--name"], "--name needs a value"),
    (TPU, ["create", "--name", "Bad_Name", "--zone", "z"], "bad --name 'Bad_Name'"),
    (TPU, ["run", *TPU_ID, "--workdir", "gs://b/r"], "needs --config"),
    (TPU, ["run", *TPU_ID, "--config", "configs/tiny.py"], "needs --workdir"),
    (TPU, ["logs", *TPU_ID, "--worker", "x"], "bad --worker 'x'"),
    (TPU, ["delete", *TPU_ID, "--", "--config.a=1"], "only for run and all"),
    (TPU, ["setup", *TPU_ID, "--repo-dir", "/nonexistent/repo"], "bad --repo-dir"),
    (SLURM, [], "missing --config"),
    (SLURM, ["--config", "configs/tiny.py"], "missing --workdir"),
    (SLURM, ["--bogus"], "unknown argument '--bogus'"),
    (SLURM, ["--config.train.num_steps=3"], "overrides go after --"),
    (SLURM, ["--config", "c", "--workdir", "w", "--port", "http"], "bad --port 'http'"),
    (SLURM, ["--config", "c", "--workdir", "w"], "SLURM_JOB_ID is not set"),
    (LOCAL, [], "missing NUM_PROCESSES"),
    (LOCAL, ["0", "1", "--", "--config=c"], "bad NUM_PROCESSES '0'"),
    (LOCAL, ["two", "1", "--", "--config=c"], "bad NUM_PROCESSES 'two'"),
    (LOCAL, ["2"], "missing DEVICES_PER_PROCESS"),
    (LOCAL, ["2", "-4", "--", "--config=c"], "bad DEVICES_PER_PROCESS '-4'"),
    (LOCAL, ["2", "4", "--config=c"], "expected -- before"),
    (LOCAL, ["2", "4"], "missing -- before"),
    (LOCAL, ["2", "4", "--"], "no llava_jax.main arguments"),
]


@pytest.mark.parametrize(
    ("script", "args", "message"), BAD_ARGS, ids=[f"{s.name}:{m}" for s, _, m in BAD_ARGS]
)
def test_bad_arguments(fake, script, args, message):
    result = run(script, *args, env=fake.environ)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert not fake.calls(), "nothing may run after bad arguments"


# --- tpu_pod.sh ---------------------------------------------------------------------------


def test_tpu_create_and_delete(fake):
    ids = [*TPU_ID, "--project", "proj"]
    create = ["create", *ids, "--accelerator", "v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
    assert run(TPU, *create, env=fake.environ).returncode == 0
    assert run(TPU, "delete", *ids, env=fake.environ).returncode == 0
    gcloud = ["compute", "tpus", "tpu-vm"]
    where = ["my-tpu", "--zone=us-central2-b", "--project=proj"]
    assert [c["argv"] for c in fake.calls()] == [
        [
            *gcloud,
            "create",
            *where,
            "--accelerator-type=v5p-64",
            "--version=v2-alpha-tpuv5",
            "--spot",
        ],
        [*gcloud, "delete", *where, "--quiet"],
    ]


def test_tpu_create_defaults_and_dry_run(fake):
    env = dict(fake.environ, DRY_RUN="1")
    result = run(TPU, "create", *TPU_ID, env=env)
    assert result.returncode == 0, result.stderr
    assert not fake.calls()
    assert result.stdout.strip() == (
        "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b"
        " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )


def test_tpu_setup_copies_the_working_tree(fake):
    repo = fake.path / "repo"
    (repo / "llava_jax").mkdir(parents=True)
    (repo / "llava_jax" / "main.py").write_text("# main\n")
    (repo / "setup.py").write_text("# setup\n")
    (repo / ".gitignore").write_text("/workdir/\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "notes with space.txt").write_text("untracked, not ignored\n")
    (repo / "workdir").mkdir()
    (repo / "workdir" / "big.ckpt").write_text("ignored\n")

    result = run(TPU, "setup", *TPU_ID, "--repo-dir", repo, env=fake.environ)
    assert result.returncode == 0, result.stderr
    scp, ssh = fake.calls()
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp["argv"][5:] == [
        "my-tpu:llava_jax_repo.tar.gz",
        "--zone=us-central2-b",
        "--worker=all",
    ]
    with tarfile.open(fake.path / "scp_copy.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"llava_jax/main.py", "setup.py", ".gitignore", "notes with space.txt"} <= names
    assert not any(n.startswith((".git/", "workdir")) for n in names), names

    assert ssh["argv"][:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b"]
    assert "--worker=all" in ssh["argv"]
    (command,) = [a for a in ssh["argv"] if a.startswith("--command=")]
    assert "tar -xzf llava_jax_repo.tar.gz" in command
    assert "pip install -e . 'jax[tpu]'" in command
    assert "python3.11 -m venv" in command


def _remote_command(call):
    (command,) = [a for a in call["argv"] if a.startswith("--command=")]
    return command.removeprefix("--command=")


def _wait_for(path, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_tpu_run_logs_stop(fake):
    """run's remote command, executed here with a fake home, starts the trainer with the
    arguments intact, refuses a second start while it runs, and stop sends it SIGTERM."""
    home = fake.path / "home"
    (home / "llava_jax").mkdir(parents=True)
    venv_bin = home / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    args_file = home / "args"
    # The "trainer": write cwd and argv (NUL-separated), then wait to be stopped.
    (venv_bin / "python").write_text(
        f'#!/usr/bin/env bash\nprintf \'%s\\0\' "$PWD" "$@" >{args_file}.tmp\n'
        f"mv {args_file}.tmp {args_file}\nexec sleep 30\n"
    )
    (venv_bin / "python").chmod(0o755)

    ids = [*TPU_ID, "--venv", home / "venv"]
    workdir = "gs://bucket/run 1"
    result = run(
        TPU,
        "run",
        *ids,
        "--config",
        "configs/tiny.py:a,b",
        "--workdir",
        workdir,
        "--",
        *TRICKY,
        env=fake.environ,
    )
    assert result.returncode == 0, result.stderr
    assert "logs --name my-tpu --zone us-central2-b" in result.stderr  # how to follow it
    (call,) = fake.calls()
    assert call["argv"][:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in call["argv"]

    remote = _remote_command(call)
    worker_env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    started = subprocess.run(
        ["bash", "-c", remote], env=worker_env, capture_output=True, text=True, timeout=10
    )
    assert started.returncode == 0, started.stderr
    _wait_for(args_file)
    cwd, *argv = args_file.read_text().split("\0")[:-1]
    assert cwd == str(home / "llava_jax")
    assert argv == [
        "-m",
        "llava_jax.main",
        "--distributed",
        "--config=configs/tiny.py:a,b",
        f"--workdir={workdir}",
        *TRICKY,
    ]
    logs = home / "llava_jax_logs"
    assert (logs / "latest.log").is_symlink()
    assert (logs / "latest.log").resolve().parent == logs.resolve()
    trainer_pid = int((logs / "train.pid").read_text())
    os.kill(trainer_pid, 0)

    again = subprocess.run(["bash", "-c", remote], env=worker_env, capture_output=True, text=True)
    assert again.returncode != 0
    assert "still running" in again.stderr

    assert run(TPU, "logs", *ids, "--worker", "2", env=fake.environ).returncode == 0
    assert run(TPU, "stop", *ids, env=fake.environ).returncode == 0
    logs_call, stop_call = fake.calls()[1:]
    assert "--worker=2" in logs_call["argv"]
    assert "tail -n 100 -F" in _remote_command(logs_call)
    assert "--worker=all" in stop_call["argv"]
    stopped = subprocess.run(
        ["bash", "-c", _remote_command(stop_call)], env=worker_env, capture_output=True, text=True
    )
    assert "sent SIGTERM" in stopped.stdout
    deadline = time.monotonic() + 5
    while _alive(trainer_pid):
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.02)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_tpu_run_needs_setup(fake):
    home = fake.path / "home"
    home.mkdir()
    result = run(TPU, "run", *TPU_ID, "--config", "c", "--workdir", "w", env=fake.environ)
    assert result.returncode == 0
    (call,) = fake.calls()
    worker = subprocess.run(
        ["bash", "-c", _remote_command(call)],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    assert worker.returncode != 0
    assert "run setup first" in worker.stderr


# --- gpu_slurm.sh -------------------------------------------------------------------------


def _slurm_env(fake, **extra):
    return dict(
        fake.environ,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-[07-08]",
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
        **extra,
    )


def test_gpu_slurm_one_process_per_node(fake):
    args = ["--config", "configs/llava_v15.py:7b,pretrain", "--workdir=/shared/run 1"]
    result = run(SLURM, *args, "--", *TRICKY, env=_slurm_env(fake))
    assert result.returncode == 0, result.stderr
    assert (
        fake.path / "calls.jsonl.scontrol"
    ).read_text() == "scontrol show hostnames gpu-[07-08]\n"
    (srun,) = fake.calls()
    options = srun["argv"][: srun["argv"].index("bash")]
    for option in ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]:
        assert option in options
    coordinator = f"gpu-07:{20000 + 4242}"
    assert srun["env"]["LLAVA_COORDINATOR_ADDRESS"] == coordinator

    procs = fake.procs()
    assert sorted(procs) == [0, 1]
    for i, proc in procs.items():
        assert proc["env"]["LLAVA_PROCESS_ID"] == str(i)
        assert proc["env"]["LLAVA_NUM_PROCESSES"] == "2"
        assert proc["env"]["LLAVA_COORDINATOR_ADDRESS"] == coordinator
        assert proc["argv"] == [
            "--config=configs/llava_v15.py:7b,pretrain",
            "--workdir=/shared/run 1",
            *TRICKY,
        ]


def test_gpu_slurm_port(fake):
    result = run(SLURM, "--config=c", "--workdir=w", "--port", "1234", env=_slurm_env(fake))
    assert result.returncode == 0, result.stderr
    coordinators = {p["env"]["LLAVA_COORDINATOR_ADDRESS"] for p in fake.procs().values()}
    assert coordinators == {"gpu-07:1234"}


def test_gpu_slurm_propagates_failure(fake):
    """srun's exit code is the script's: here task 1 exits 3."""
    (fake.path / "fail_main.py").write_text(
        "import os, sys\nsys.exit(3 if os.environ['LLAVA_PROCESS_ID'] == '1' else 0)\n"
    )
    env = _slurm_env(fake, LLAVA_MAIN_MODULE="fail_main")
    result = run(SLURM, "--config=c", "--workdir=w", env=env)
    assert result.returncode == 3


def test_gpu_slurm_needs_srun(fake):
    env = _slurm_env(fake, PATH=str(fake.path / "empty"))
    result = subprocess.run(
        [shutil.which("bash"), str(SLURM), "--config=c", "--workdir=w"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0
    assert "srun not found" in result.stderr


def test_gpu_slurm_dry_run_outside_slurm(fake):
    result = run(SLURM, "--config=c", "--workdir=w", env=dict(fake.environ, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    assert "srun" in result.stdout and "--ntasks-per-node=1" in result.stdout
    assert not fake.calls()


# --- local_multiprocess.sh ----------------------------------------------------------------


def test_local_processes_share_coordinator_and_args(fake):
    env = dict(fake.environ, LOG_DIR=str(fake.path / "logs"))
    result = run(LOCAL, 3, 2, "--", "--config=configs/tiny.py", *TRICKY, env=env)
    assert result.returncode == 0, result.stderr
    procs = fake.procs()
    assert sorted(procs) == [0, 1, 2]
    coordinators = {p["env"]["LLAVA_COORDINATOR_ADDRESS"] for p in procs.values()}
    assert len(coordinators) == 1
    assert coordinators.pop().startswith("127.0.0.1:")
    for i, proc in procs.items():
        env_i = proc["env"]
        assert env_i["LLAVA_PROCESS_ID"] == str(i)
        assert env_i["LLAVA_NUM_PROCESSES"] == "3"
        assert env_i["JAX_PLATFORMS"] == "cpu"
        assert env_i["LLAVA_CPU_COLLECTIVES"] == "gloo"
        # conftest's device count (8) is replaced, not duplicated.
        assert env_i["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=2") == 1
        assert "--xla_force_host_platform_device_count=8" not in env_i["XLA_FLAGS"]
        assert proc["argv"] == ["--config=configs/tiny.py", *TRICKY]
    assert "hello from process 0" in result.stdout
    assert "hello from process 1" not in result.stdout
    for i in (1, 2):
        assert f"hello from process {i}" in (fake.path / "logs" / f"process_{i}.log").read_text()
    assert str(fake.path / "logs") in result.stderr


def test_local_failure_stops_the_others(fake):
    env = dict(fake.environ, FAKE_MODE="fail", STOP_TIMEOUT="5")
    start = time.monotonic()
    result = run(LOCAL, 3, 1, "--", "--config=c", env=env)
    assert result.returncode == 3
    assert time.monotonic() - start < 10  # the others sleep 30 s unless stopped
    assert "process 1 failed with exit code 3" in result.stderr
    procs = fake.procs()
    assert sorted(procs) == [0, 1, 2]
    for i in (0, 2):
        assert (fake.out_dir / f"term_{i}").exists()
        assert not _alive(procs[i]["pid"])


def test_local_sigterm_reaches_every_process(fake):
    env = dict(fake.environ, FAKE_MODE="sleep", STOP_TIMEOUT="5")
    proc = subprocess.Popen(
        [str(LOCAL), "3", "1", "--", "--config=c"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for i in range(3):
            _wait_for(fake.out_dir / f"proc_{i}.json")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Every process got SIGTERM and exited cleanly (as the trainer does after saving).
    assert proc.returncode == 0, stderr
    assert sorted(p.name for p in fake.out_dir.glob("term_*")) == ["term_0", "term_1", "term_2"]
