"""slurm/train.sbatch and slurm/tune.sbatch without slurm: dry runs under a fake SLURM_* environment
(no scontrol on PATH) print exactly the per-node commands; the real paths run against stub
srun/scontrol/deepspeed/ray/mlflow/python; shellcheck passes. Nothing here starts training."""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "slurm" / "train.sbatch"
TUNE = ROOT / "slurm" / "tune.sbatch"
BASH = shutil.which("bash") or "/bin/bash"
FAKE_JOB = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "123", "SLURM_NNODES": "2",
            "SLURM_GPUS_ON_NODE": "4"}
USER_ARGS = ["target=rte", "sources=[mnli,qnli]", "stage2.threshold=0.1"]


def dry_run(script: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The script in dry-run mode with only the given environment; PATH is an empty folder, so no
    scontrol, srun or anything else can be found (the dry run needs only bash builtins)."""
    empty = tmp_path / "empty_path"
    empty.mkdir(exist_ok=True)
    full_env = {"PATH": str(empty), "DRY_RUN": "1", **env}
    return subprocess.run([BASH, str(script), *args], check=False, env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def node_commands(stdout: str) -> list[tuple[str, list[str]]]:
    """The '[host] command' lines of a dry run, as (host, words)."""
    commands = []
    for line in stdout.splitlines():
        if line.startswith("["):
            host, _, command = line.partition("] ")
            commands.append((host[1:], shlex.split(command)))
    return commands


def option(words: list[str], name: str) -> str:
    """The value of `name VALUE` or `name=VALUE` in words."""
    for i, word in enumerate(words):
        if word == name:
            return words[i + 1]
        if word.startswith(name + "="):
            return word[len(name) + 1:]
    raise AssertionError(f"{name} not in {words}")


# ----------------------------------------------------------------------------- train.sbatch


def test_train_dry_run_one_launcher_per_node(tmp_path):
    result = dry_run(TRAIN, tmp_path, *USER_ARGS, DS_CONFIG="ds_configs/zero2.json", **FAKE_JOB)
    assert result.returncode == 0, result.stderr
    hostfile = ROOT / "runs" / "slurm" / "hostfile-123"
    lines = result.stdout.splitlines()
    start = lines.index(f"# hostfile {hostfile}:")
    assert lines[start + 1:start + 4] == ["gpu01 slots=4", "gpu02 slots=4", "# srun, one task per node:"]

    commands = node_commands(result.stdout)
    assert [host for host, _ in commands] == ["gpu01", "gpu02"]
    deepspeed = str(ROOT / ".venv" / "bin" / "deepspeed")
    for rank, (_host, words) in enumerate(commands):
        assert words[0] == deepspeed
        assert words.count(deepspeed) == 1 and "--no_ssh" in words
        assert option(words, "--node_rank") == str(rank)
        assert option(words, "--master_addr") == "gpu01"
        assert option(words, "--num_gpus") == "4"
        assert option(words, "--num_nodes") == "2"
        assert option(words, "--hostfile") == str(hostfile)
        assert option(words, "--master_port").isdigit()
        script = words.index("dtvg_scale/train.py")
        assert words[script:] == ["dtvg_scale/train.py", "--ds_config", "ds_configs/zero2.json", *USER_ARGS]
        assert "--node_rank" not in words[script:]  # launcher options come before the script

    # one srun, one task per node; each task's --node_rank is its SLURM_NODEID
    srun = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert len(srun) == 1
    assert "--ntasks-per-node=1" in srun[0] and "--nodes=2" in srun[0]
    wrapper = srun[0][srun[0].index("-c") + 1]
    assert '--node_rank "$SLURM_NODEID"' in wrapper
    node0 = commands[0][1]
    assert srun[0][srun[0].index("-c") + 2:] == node0[:1] + node0[3:]  # node 0's line without --node_rank 0


def test_train_dry_run_defaults_and_node_list_expansion(tmp_path):
    """No scontrol: comma lists and bracket ranges are expanded here, zero padding kept; the GPU
    count falls back to SLURM_GPUS_PER_NODE without its type; the config to ds_configs/zero3.json.
    A dry run writes nothing."""
    hostfile = tmp_path / "hostfile"
    result = dry_run(TRAIN, tmp_path, SLURM_JOB_NODELIST="gpu[01-03,07],cpu5,n-[8-10]a",
                     SLURM_GPUS_PER_NODE="a100:2", HOSTFILE=str(hostfile))
    assert result.returncode == 0, result.stderr
    assert not hostfile.exists()
    hosts = ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5", "n-8a", "n-9a", "n-10a"]
    assert all(f"{host} slots=2" in result.stdout.splitlines() for host in hosts)
    commands = node_commands(result.stdout)
    assert [host for host, _ in commands] == hosts
    assert [option(words, "--node_rank") for _, words in commands] == [str(i) for i in range(len(hosts))]
    assert all(option(words, "--ds_config") == "ds_configs/zero3.json" for _, words in commands)
    assert all(option(words, "--master_addr") == "gpu01" for _, words in commands)


def test_train_dry_run_uses_scontrol_when_present(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", 'printf "alpha\\nbeta\\n"')
    result = subprocess.run([BASH, str(TRAIN)], check=False, env={"PATH": str(bin_dir), "DRY_RUN": "1",
                            "SLURM_JOB_NODELIST": "whatever[1-2]"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [host for host, _ in node_commands(result.stdout)] == ["alpha", "beta"]


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_NODELIST": "gpu[01-02]"}, "not inside a slurm job"),
    ({"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "3"}, "SLURM_NNODES=3"),
    ({"DRY_RUN": "1", "SLURM_JOB_NODELIST": "a[1-2]b[1-2]"}, "too complex to expand without scontrol"),
    ({"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu01", "DS_CONFIG": "nope.json"}, "DeepSpeed config not found"),
    ({"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu01", "GPUS_PER_NODE": "four"}, "cannot read a GPU count"),
])
def test_train_clear_errors(tmp_path, env, message):
    result = subprocess.run([BASH, str(TRAIN)], check=False, env={"PATH": str(tmp_path), **env}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


def stub(path: Path, body: str) -> None:
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def test_train_real_path_with_stub_srun(tmp_path):
    """Not a dry run: the hostfile is written, srun gets the dry run's line, and each task (run here
    by a stub srun with SLURM_NODEID 0 and 1) execs deepspeed with its node rank and SIGUSR1 ignored."""
    bin_dir, venv, log = tmp_path / "bin", tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", 'printf "gpu01\\ngpu02\\n"')
    stub(bin_dir / "srun", f'echo "srun $*" >> {log}\n'
                           'while [[ $# -gt 0 && $1 == -* ]]; do shift; done\n'
                           'for n in 0 1; do SLURM_NODEID=$n "$@"; done')
    stub(venv / "bin" / "deepspeed", f'echo "deepspeed $* ignored=$(trap -p USR1)" >> {log}')
    hostfile = tmp_path / "shared" / "hostfile"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **FAKE_JOB, "VENV": str(venv),
           "HOSTFILE": str(hostfile), "REPO": str(ROOT)}
    result = subprocess.run([BASH, str(TRAIN), *USER_ARGS], check=False, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert hostfile.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1")
    for rank, call in enumerate(calls[1:]):
        assert call.startswith(f"deepspeed --node_rank {rank} --no_ssh --hostfile {hostfile} ")
        assert "dtvg_scale/train.py --ds_config ds_configs/zero3.json target=rte sources=[mnli,qnli]" in call
        assert "ignored=trap -- '' SIGUSR1" in call
    assert len(calls) == 3


# ------------------------------------------------------------------------------ tune.sbatch


def test_tune_dry_run_ray_cluster_mlflow_and_sweep(tmp_path):
    result = dry_run(TUNE, tmp_path, *USER_ARGS, **FAKE_JOB)
    assert result.returncode == 0, result.stderr
    commands = node_commands(result.stdout)
    venv_bin = ROOT / ".venv" / "bin"
    assert [host for host, _ in commands] == ["gpu01", "gpu02", "gpu01", "gpu01"]
    (_, head), (_, worker), (_, mlflow), (_, sweep) = commands

    def after(words: list[str], exe: Path) -> list[str]:
        assert words[0] == "srun" and "--overlap" in words and words[-1] == "&"
        return words[words.index(str(exe)):-1]

    assert option(head, "--nodelist") == "gpu01"
    assert after(head, venv_bin / "ray") == [str(venv_bin / "ray"), "start", "--head", "--block", "--port=6379",
                                              "--num-gpus=4"]
    assert option(worker, "--nodelist") == "gpu02"
    assert after(worker, venv_bin / "ray") == [str(venv_bin / "ray"), "start", "--block", "--address=gpu01:6379",
                                                "--num-gpus=4"]
    mlflow_dir = ROOT / "runs" / "mlflow"
    assert option(mlflow, "--nodelist") == "gpu01"
    assert after(mlflow, venv_bin / "mlflow") == [
        str(venv_bin / "mlflow"), "server", "--workers", "1", "--host", "0.0.0.0", "--port", "5000",
        "--backend-store-uri", f"sqlite:///{mlflow_dir}/mlflow.db",
        "--default-artifact-root", f"{mlflow_dir}/artifacts"]
    assert mlflow[mlflow.index(str(venv_bin / "mlflow")) - 1] == "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"
    assert sweep == ["MLFLOW_TRACKING_URI=http://gpu01:5000", "RAY_ADDRESS=gpu01:6379", str(venv_bin / "python"),
                     "tune/sweep.py", "--address", "auto", *USER_ARGS]


def test_tune_dry_run_external_mlflow_and_options(tmp_path):
    result = dry_run(TUNE, tmp_path, SLURM_JOB_NODELIST="gpu[01-03]", SLURM_CPUS_PER_TASK="16",
                     MLFLOW_TRACKING_URI="http://tracking:80", RAY_PORT="7000", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    commands = node_commands(result.stdout)
    assert [host for host, _ in commands] == ["gpu01", "gpu02", "gpu03", "gpu01"]  # no MLflow server
    assert "mlflow" not in result.stdout.replace("MLFLOW_TRACKING_URI", "")
    assert all({"--num-gpus=2", "--num-cpus=16"} <= set(words) for _, words in commands[:3])
    assert option(commands[1][1], "--address") == "gpu01:7000"
    assert commands[-1][1][:2] == ["MLFLOW_TRACKING_URI=http://tracking:80", "RAY_ADDRESS=gpu01:7000"]


def test_tune_real_path_with_stubs(tmp_path):
    """Not a dry run, against stubs: Ray head, worker, MLflow, then the sweep with its environment;
    SIGUSR1 to the script reaches the sweep; the sweep's status is the script's; every background
    step is stopped at the end."""
    bin_dir, venv, repo, log = tmp_path / "bin", tmp_path / "venv", tmp_path / "repo", tmp_path / "log"
    for folder in (bin_dir, venv / "bin", repo / "dtvg_scale", repo / "tune"):
        folder.mkdir(parents=True)
    (repo / "dtvg_scale" / "train.py").touch()
    (repo / "tune" / "sweep.py").touch()
    serve = "trap 'echo \"$1 $2 stopped\" >> {log}; exit 0' TERM; while :; do sleep 0.1; done"
    stub(bin_dir / "scontrol", 'printf "gpu01\\ngpu02\\n"')
    stub(bin_dir / "srun", 'while [[ $# -gt 0 && $1 == -* ]]; do shift; done; exec "$@"')
    stub(venv / "bin" / "ray", f'echo "ray $* uri=$MLFLOW_TRACKING_URI" >> {log}; ' + serve.format(log=log))
    stub(venv / "bin" / "mlflow", f'echo "mlflow $* jobs=$MLFLOW_SERVER_ENABLE_JOB_EXECUTION" >> {log}; '
                                  + serve.format(log=log))
    stub(venv / "bin" / "python", f'[[ $1 == -c ]] && exit 0\n'
                                  f"trap 'echo saved >> {log}; exit 7' USR1\n"
                                  f'echo "sweep $* ray=$RAY_ADDRESS uri=$MLFLOW_TRACKING_URI" >> {log}\n'
                                  'for _ in $(seq 300); do sleep 0.1; done; exit 1')
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **FAKE_JOB, "VENV": str(venv), "REPO": str(repo)}
    # its own process group, so that a failure here cannot leave the stubs' loops running
    proc = subprocess.Popen([BASH, str(TUNE), "target=rte"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "sweep " in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 7, stderr
    calls = log.read_text().splitlines()
    assert "ray start --head --block --port=6379 --num-gpus=4 uri=http://gpu01:5000" in calls
    assert "ray start --block --address=gpu01:6379 --num-gpus=4 uri=http://gpu01:5000" in calls
    mlflow_dir = repo / "runs" / "mlflow"
    assert (f"mlflow server --workers 1 --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///{mlflow_dir}/mlflow.db"
            f" --default-artifact-root {mlflow_dir}/artifacts jobs=false") in calls
    assert "sweep tune/sweep.py --address auto target=rte ray=gpu01:6379 uri=http://gpu01:5000" in calls
    assert calls.index("saved") > max(i for i, c in enumerate(calls) if c.startswith(("ray ", "mlflow ")))
    assert sorted(c for c in calls if c.endswith("stopped")) == ["server --workers stopped", "start --block stopped",
                                                                  "start --head stopped"]


# ------------------------------------------------------------------------------- shellcheck


@pytest.mark.parametrize("script", [TRAIN, TUNE], ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not on PATH (apt-get install shellcheck); the scripts are not linted")
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout
