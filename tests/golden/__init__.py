"""Golden results: what a run decided and scored, pinned in this folder (issue 12: a redesign keeps behaviour).

``snapshot(run_dir)`` reads a ``train.py`` run folder into one dict: its ``results.json`` (every
score, group at the best step, SPoT's source, sharding) and every Stage-II ``group_trace.jsonl``
(per step: similarities, KC, candidates, group). ``check(snapshot, name)`` compares it with
``tests/golden/<name>.json``: names, groups, counts and strings exactly, floats to a relative
1e-6 (a refactor may reorder a sum; a changed decision is never within that). Scores are counts
over 128 or fewer examples, so they compare exactly too.

To rewrite a golden file after a deliberate change of behaviour, run its test with
``DTVG_UPDATE_GOLDEN=1`` and say in the commit why the numbers moved.

**Pinned per machine.** The same code, seed and thread count give other floats on another CPU:
MKL and ATen pick their kernels by the processor (seen: the goldens pinned on session 9's machine
failed on session 10's AMD EPYC with AVX2, 144 float differences of ~1e-5 relative in the 2-rank
tiny T5's traces; in the controlled quick run, whose backbone is pretrained and prompts trained at
lr 0.3, the target's Stage-I score itself moved, 0.875 -> 0.984; ``MKL_CBWR=COMPATIBLE`` and
``ATEN_CPU_CAPABILITY=default`` did not bring the old bits back). So the golden files live in
``tests/golden/<numerics>/``, where ``<numerics>`` is ``numerics_fingerprint()``: a hash of what a
fixed tiny T5 and LLaMA compute forward and backward on this machine, in a process with one
thread, as the pinned runs use. On a machine with a folder of its own, ``check`` compares exactly;
on one without, it skips (``pytest.skip``, the test's other assertions having passed): pin that
machine's results with ``DTVG_UPDATE_GOLDEN=1`` on the code *before* a change, then compare after.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REL, ABS = 1e-6, 1e-9

# Run in a fresh one-thread process, like the pinned runs' ranks (OMP_NUM_THREADS=1): a tiny T5 and
# a tiny LLaMA from fixed seeds, forward and backward, and a bf16 product; the hash of every bit.
# The models are built here, not by dtvg_scale (synthetic.make_tiny_model), so that no change to the
# package can change the name of the machine.
_FINGERPRINT_SCRIPT = """
import hashlib, torch, transformers
torch.manual_seed(0)
digest = hashlib.sha256()
t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
    vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
    feed_forward_proj="relu", decoder_start_token_id=0))
llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=64))
ids = torch.randint(3, 96, (4, 12))
for model, kwargs in ((t5, {"labels": ids[:, :3].contiguous()}), (llama, {"labels": ids})):
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).loss
    loss.backward()
    digest.update(loss.detach().numpy().tobytes())
    for p in model.parameters():
        if p.grad is not None:  # tied or unused weights have none
            digest.update(p.grad.numpy().tobytes())
a, b = torch.randn(64, 64).bfloat16(), torch.randn(64, 64).bfloat16()
digest.update((a @ b).float().numpy().tobytes())
print(digest.hexdigest()[:12])
"""


@functools.lru_cache(maxsize=1)
def numerics_fingerprint() -> str:
    """12 hex digits naming how this machine's torch computes (see the module docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT], env=env, capture_output=True, text=True,
                          check=True, timeout=300)
    return done.stdout.strip().splitlines()[-1]


def machine_folder() -> Path:
    return HERE / numerics_fingerprint()


def describe_machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(run_dir: Path) -> dict[str, Any]:
    traces = {path.parent.name: read_jsonl(path) for path in sorted((run_dir / "stage2").glob("*/group_trace.jsonl"))}
    return {"results": json.loads((run_dir / "results.json").read_text()), "group_traces": traces}


def differences(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Every place where ``actual`` departs from ``expected``, as ``path: actual != expected``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if list(actual) != list(expected):
            return [f"{where}: keys {list(actual)} != {list(expected)}"]
        return [d for key in expected for d in differences(actual[key], expected[key], f"{where}/{key}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items != {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in differences(a, e, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if math.isclose(actual, expected, rel_tol=REL, abs_tol=ABS) else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected and type(actual) is type(expected) else [f"{where}: {actual!r} != {expected!r}"]


def dumps(value: Any, indent: str = "") -> str:
    """JSON with a dict's keys one per line and a list's items one per line, each item (a trace
    row, a group) on a single line: a changed decision shows as one changed line in a diff."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        rows = [f"{inner}{json.dumps(key)}: {dumps(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(rows) + f"\n{indent}}}"
    if isinstance(value, list) and value and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + json.dumps(item) for item in value) + f"\n{indent}]"
    return json.dumps(value)


def check(actual: dict[str, Any], name: str) -> None:
    """Compare with this machine's golden file; call it last in a test: without one, it skips."""
    folder = machine_folder()
    path = folder / f"{name}.json"
    if os.environ.get("DTVG_UPDATE_GOLDEN") == "1":
        folder.mkdir(exist_ok=True)
        (folder / "machine.json").write_text(json.dumps(describe_machine(), indent=1) + "\n")
        path.write_text(dumps(actual) + "\n")
        return
    if not path.is_file():
        pinned = sorted(p.parent.name for p in HERE.glob(f"*/{name}.json"))
        pytest.skip(f"no golden {name} for this machine's numerics ({folder.name}; pinned for: "
                    f"{', '.join(pinned) or 'none'}): pin with DTVG_UPDATE_GOLDEN=1 on the code before a change")
    found = differences(actual, json.loads(path.read_text()))
    assert not found, (f"{len(found)} differences from {folder.name}/{path.name} (first 20):\n"
                       + "\n".join(found[:20]))
