"""Run under the deepspeed launcher by tests/test_distributed.py: load a backbone the way
train.py does, under ZeRO-3, and report per rank how much of each frozen tensor this rank holds
and whether the prompt is whole and identical on every rank after a few steps.

    deepspeed --num_gpus 2 tests/zero3_probe.py OUT_DIR embedded:t5
"""

import json
import sys
from pathlib import Path

from dtvg_scale.runtime.distributed import prepare_environment  # noqa: E402

prepare_environment()

import torch  # noqa: E402
import torch.distributed  # noqa: E402

from dtvg_scale.runtime.backbone import PromptedModel, load_backbone, read_embedding_rows, resolve_model_path  # noqa: E402
from dtvg_scale.recipes.config import Stage1Args  # noqa: E402
from dtvg_scale.runtime.distributed import all_ranks_equal, barrier, init_distributed  # noqa: E402
from dtvg_scale.runtime.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from dtvg_scale.runtime.engine import build_engine  # noqa: E402
from dtvg_scale.method.prompts import SoftPrompt, sample_init_prompt  # noqa: E402


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, name, args = Path(argv[0]), argv[1], argv[2:]
    dtype = torch.bfloat16 if "bf16" in args else torch.float32
    ctx = init_distributed()
    if ctx.is_main:
        path = resolve_model_path(name, out_dir / "backbones", 64, 2)
    barrier()
    path = resolve_model_path(name, out_dir / "backbones", 64, 2)
    loop = Stage1Args(steps=3, batch_size=4, warmup_steps=0)
    length, hidden = 8, 64
    ds_config = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), loop, ctx.world_size, dtype, length * hidden)
    backbone = load_backbone(path, name, ds_config, dtype)
    init = read_embedding_rows(backbone.model, lambda w: sample_init_prompt(w, length, 5000, 42))
    module = SoftPrompt(init)
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    engine = build_engine(prompted, [{"params": [module.prompt], "lr": 0.3}], loop, ds_config, 0.0)

    held = {}
    for pname, param in backbone.model.named_parameters():
        if param.ds_numel > length * hidden:
            held[pname] = param.ds_tensor.numel() / param.ds_numel
    tok = backbone.tokenizer
    batch = tok(["emb_target w00 w05 w07", "emb_target w09 w10 w11"], return_tensors="pt", padding=True)
    labels = tok(["1", "0"], return_tensors="pt", padding=True)["input_ids"]
    if not backbone.is_encoder_decoder:
        batch = tok(["emb_target w00 w05 w07 1", "emb_target w09 w10 w11 0"], return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
    # each rank gets a different half of the data, so only gradient averaging keeps prompts equal
    sl = slice(ctx.rank, ctx.rank + 1)
    for _ in range(loop.steps):
        loss, _ = engine(input_ids=batch["input_ids"][sl], attention_mask=batch["attention_mask"][sl], labels=labels[sl])
        engine.backward(loss)
        engine.step()
    prompt = module.prompt
    report = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "held_fraction": held,
        "prompt_numel_here": prompt.data.numel(),
        "prompt_ds_numel": prompt.ds_numel,
        "prompt_persistent": bool(getattr(prompt, "ds_persist", False)),
        "prompt_equal_across_ranks": all_ranks_equal(prompt.data.float()),
        "prompt_changed": not torch.equal(prompt.data.float(), init.float()),
        "init_equal_across_ranks": all_ranks_equal(init.float()),
        "dtype": str(prompt.dtype),
    }
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    engine.destroy()
    # tear the process group down in order: left to interpreter exit, gloo's threads were once
    # destroyed while joinable ("terminate called without an active exception", rank 1 aborted)
    barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
