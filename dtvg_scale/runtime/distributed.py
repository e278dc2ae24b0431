"""Process-group setup and the few collectives the engine needs.

Launched by ``deepspeed`` (or torchrun) the ranks come from the environment; run as a plain
``python`` process it becomes a world of one, so the same code path serves both.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a process group's store)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment() -> None:
    """Before deepspeed is imported: pick the CPU accelerator where there is no GPU, and make a
    lone process a world of one (deepspeed otherwise tries MPI discovery); then import it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        clear_stale_build_lock(use_own_extension_dir())
    if "RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import_deepspeed()


def import_deepspeed() -> None:
    """Import DeepSpeed (once its environment is set) without the MLflow import its autotuner
    makes at import time: ~1.4 s of CPU at every rank's start, for a feature this package never
    uses. Tracking imports MLflow itself when it is on; if MLflow is already loaded, it stays."""
    if "deepspeed" in sys.modules:
        return
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner handles
    try:
        import deepspeed  # noqa: F401
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    skip_muon_import()


def skip_muon_import() -> None:
    """Every ZeRO engine DeepSpeed builds imports its Muon optimizer, and ZeRO-1/2 its Muon update,
    only to ask whether ours is Muon (``isinstance(optimizer, MuonWithAuxAdam)``, a parameter's
    ``use_muon``); those modules decorate kernels with ``torch.compile``, which imports torch's
    inductor: about a second of CPU at every rank's start. This package always hands DeepSpeed its own
    torch optimizer (a ds_config optimizer is refused), so stand-in modules give every such check
    its answer: a class nothing is an instance of, an update that is never called."""
    import types

    class MuonWithAuxAdam:  # never instantiated
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("dtvg_scale stands in for DeepSpeed's Muon, which it never uses")

    for name, attribute in (("deepspeed.runtime.zero.muon.muon_optimizer", MuonWithAuxAdam),
                            ("deepspeed.runtime.zero.muon.original_muon", muon_update)):
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "stand-in: dtvg_scale never uses DeepSpeed's Muon")
            setattr(stand_in, attribute.__name__, attribute)
            sys.modules[name] = stand_in


# On the CPU, DeepSpeed compiles a shared-memory all-reduce op (deepspeed_shm_comm, ~30 s) the
# first time a process group starts, under a lock file that torch waits on forever. A build
# killed midway (a cancelled job, a test's timeout) leaves the lock behind and every later launch
# hung at start (seen: a whole CI run). A load of an op already built holds the lock for well
# under a second, so a lock this old has no live owner.
STALE_BUILD_LOCK_SECONDS = 180
SHM_OP_NAME = "deepspeed_shm_comm"


def use_own_extension_dir() -> str:
    """Give compiled ops a folder per (Python, torch, deepspeed) install, unless
    ``$TORCH_EXTENSIONS_DIR`` says otherwise. torch's default folder is shared by every virtual
    environment of the user, and its build file names the environment's include paths, so two
    environments used in turn rebuilt the op each time, and one's killed build blocked the other."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from dtvg_scale.runtime.cache import cache_root

        deepspeed_spec = importlib.util.find_spec("deepspeed")
        install = "|".join([sys.version, torch.__file__, torch.__version__, str(deepspeed_spec and deepspeed_spec.origin)])
        key = hashlib.sha256(install.encode()).hexdigest()[:16]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root() / "torch_extensions" / key)
    return os.environ["TORCH_EXTENSIONS_DIR"]


def clear_stale_build_lock(extensions_dir: str, stale_after: float = STALE_BUILD_LOCK_SECONDS) -> bool:
    """Wait while another process builds the shm op; remove its lock once it is older than
    ``stale_after`` seconds (its builder is gone), saying so in one line. True if one was removed."""
    lock = os.path.join(extensions_dir, SHM_OP_NAME, "lock")
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return False
        if age > stale_after:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
                print(f"warning: removed {lock}, a build lock {age:.0f} s old whose build was killed "
                      "(it would have hung this launch)", file=sys.stderr, flush=True)
            return True
        time.sleep(min(1.0, stale_after - age + 0.01))


def build_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shm op now, in one process (setup.sh), rather than in the first
    launch's ranks."""
    prepare_environment()
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible(verbose=False):
        builder.load(verbose=False)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    prepare_environment()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    # Also when torch.distributed is already up (Ray Train built it): DeepSpeed then wraps that
    # process group, and its config sees the real world size.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        atexit.register(_unlink_shm_buffer, local_rank)
        # Small randomly initialised models produce denormal floats, which x86 CPUs handle
        # ~40x slower (seen: 1.0 s vs 0.024 s per tiny-T5 step); flushing them changes no result
        # that matters and is what GPUs do in practice.
        torch.set_flush_denormal(True)
        # Ranks sharing a machine would otherwise each use every core and oversubscribe them.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _unlink_shm_buffer(local_rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB ``/dev/shm`` file per rank, named after the
    master address and port, and never removes it: each launch leaked 132 MB of RAM (20 GB seen
    after a day of runs). Removing the name at exit is safe: mappings outlive the name."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if address and port:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{local_rank}"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def shutdown_distributed() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter teardown,
    gloo's threads sometimes abort the process ("terminate called without an active exception",
    exit -6) after a run that otherwise ended well; call it after every engine is destroyed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_equal(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is identical on every rank (one all-gather)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; one broadcast)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value) -> list | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def on_main_then_all(fn):
    """Run ``fn`` on rank 0 first (it may build files the others then read), then on the other
    ranks. If rank 0 fails, every rank raises the same error instead of the others waiting
    forever at a barrier rank 0 never reaches."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    error: list = [None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error[0] = err
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    return result if dist.get_rank() == 0 else fn()
