"""The multi-node launch of slurm/train.sbatch, for real, on one machine: the two per-node commands
its dry run prints (one `deepspeed --no_ssh` launcher per "node", one rank each, loopback
rendezvous) train together; their prompts equal a one-launcher, two-rank run of the same
command; killing one node stops the other within a bounded time; starting both again resumes."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from dtvg_scale.runtime.checkpoint import load_tensors

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
DEEPSPEED = str(VENV / "bin" / "deepspeed")
ARGS = ["model.name_or_path=embedded:t5", "data.target=emb_target",  # the random tiny world, not the default
        "data.sources=[]", "run.stages=stage1", "data.embedded_train_size=128", "data.embedded_eval_size=16",
        "stage1.steps=30", "stage1.eval_every=5", "stage1.batch_size=16", "data.max_target_length=4",
        "run.progress=false", "run.tracking=false", "run.check_rank_agreement=true"]
RUN = Path("stage1") / "emb_target"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_commands(tmp_path: Path, out: Path) -> list[list[str]]:
    """What train.sbatch would run on each of two nodes ("localhost" and "127.0.0.1": two names for
    this machine), from its dry run; the hostfile it prints is written where it says."""
    hostfile = tmp_path / f"hostfile-{out.name}"
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
           "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()),
           "HOSTFILE": str(hostfile), "REPO": str(ROOT), "VENV": str(VENV), "DS_CONFIG": "ds_configs/zero3.json"}
    dry = subprocess.run([shutil.which("bash") or "/bin/bash", str(ROOT / "slurm" / "train.sbatch"), *ARGS, f"run.output_dir={out}"],
                         env={**env, "PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    start = lines.index(f"# hostfile {hostfile}:")
    hostfile.write_text("".join(line + "\n" for line in lines[start + 1:start + 3]))
    commands = [shlex.split(line.partition("] ")[2]) for line in lines if line.startswith("[")]
    assert [c[c.index("--node_rank") + 1] for c in commands] == ["0", "1"] and "--no_ssh" in commands[0]
    return commands


def start_nodes(commands: list[list[str]]) -> list[subprocess.Popen]:
    # each "node" in its own session, like a slurm task: killing one kills its launcher and its rank
    return [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for command in commands]


def finish(nodes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    return outputs


def prompts(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(load_tensors(out / RUN / name)[0]["prompt"] for name in ("best_prompt.safetensors",
                                                                          "last_prompt.safetensors"))


def test_two_nodes_train_like_one_launcher_and_survive_a_lost_node(tmp_path):
    """A one-launcher run, then the two nodes: node 1 is killed once training runs, node 0 stops,
    both started again resume and end with the one-launcher run's prompts and metrics (resuming
    is exact, tests/test_distributed.py, so this is also an uninterrupted two-node run's)."""
    one = tmp_path / "one_launcher"
    single = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "dtvg_scale/train.py",
                             "--ds_config", "ds_configs/zero3.json", *ARGS, f"run.output_dir={one}"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    # node 1 dies (its launcher and its rank, as when slurm loses the node) once training runs
    killed = tmp_path / "killed"
    nodes = start_nodes(node_commands(tmp_path, killed))
    deadline = time.monotonic() + 300
    while not list((killed / RUN / "checkpoints").glob("step*/manifest.json")):
        assert time.monotonic() < deadline and nodes[0].poll() is None, "no checkpoint was written"
        time.sleep(0.1)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    lost = time.monotonic()
    nodes[0].communicate(timeout=120)  # node 0 notices (its peer's sockets close) and stops
    assert nodes[0].returncode != 0 and time.monotonic() - lost < 120
    nodes[1].communicate(timeout=30)
    assert not (killed / RUN / "result.json").exists()

    outputs = finish(start_nodes(node_commands(tmp_path, killed)))  # both again: from the last complete checkpoint
    assert "Outputs:" in outputs[0]
    for a, b in zip(prompts(killed), prompts(one)):
        assert torch.equal(a, b)  # the same two ranks, whichever launchers started them
    assert (killed / RUN / "metrics.jsonl").read_text() == (one / RUN / "metrics.jsonl").read_text()
