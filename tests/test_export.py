"""python -m dtvg_scale.recipes.export: a trained prompt becomes a PEFT prompt-tuning adapter that PEFT
loads and that predicts exactly what this package predicted, for a T5 and a LLaMA backbone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["model.name_or_path=embedded:t5", "data.target=emb_target",  # the random tiny world, not the default
         "data.sources=[emb_help_a]", "data.embedded_train_size=64", "data.embedded_eval_size=16",
         "stage1.steps=6", "stage1.eval_every=3", "stage2.steps=4", "stage2.eval_every=2",
         "stage2.strategies=[dtvg]", "data.max_target_length=4", "run.progress=false", "run.tracking=false"]


def run(module_or_script: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, *module_or_script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def export(*args: str) -> subprocess.CompletedProcess:
    """``python -m dtvg_scale.recipes.export`` as a user runs it."""
    return run(["-m", "dtvg_scale.recipes.export"], *args)


def export_here(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point in this process (no interpreter start): exit code, stdout, stderr."""
    from dtvg_scale.recipes.export import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module", params=["embedded:t5", "embedded:llama"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "job"
    result = run(["dtvg_scale/train.py"], f"run.output_dir={out}", *QUICK, f"model.name_or_path={request.param}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def peft_predictions(adapter: Path, inputs: list[str], max_new_tokens: int) -> tuple[list[str], object]:
    """What a PEFT user gets: base model from the adapter's config, greedy generation, one input at
    a time (no padding question)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(base), str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    predictions = []
    with torch.no_grad():
        for text in inputs:
            encoded = tokenizer(text, return_tensors="pt")
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            if not model.config.is_encoder_decoder:
                generated = generated[:, encoded["input_ids"].shape[1]:]
            predictions.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    return predictions, model


def test_peft_loads_the_merged_prompt_and_predicts_what_we_predicted(trained, tmp_path):
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    result = export(str(trained), str(adapter), "--run", "stage2/dtvg")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported stage2/dtvg (emb_target" in result.stdout

    config = json.loads((adapter / "adapter_config.json").read_text())
    ours = load_file(str(trained / "stage2" / "dtvg" / "best_prompt.safetensors"))["prompt"]
    is_t5 = "t5" in json.loads((trained / "backbone.json").read_text())["name_or_path"]
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["task_type"] == ("SEQ_2_SEQ_LM" if is_t5 else "CAUSAL_LM")
    assert (config["num_virtual_tokens"], config["token_dim"]) == tuple(ours.shape)
    assert config["num_transformer_submodules"] == 1
    assert Path(config["base_model_name_or_path"]).is_dir()
    assert torch.equal(load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"], ours)

    rows = [json.loads(line) for line in (trained / "stage2" / "dtvg" / "test_predictions.jsonl").read_text().splitlines()]
    predictions, model = peft_predictions(adapter, [r["input"] for r in rows], max_new_tokens=4)
    assert torch.equal(model.get_prompt_embedding_to_save("default"), ours)  # what PEFT prepends
    assert predictions == [r["prediction"] for r in rows]
    about = json.loads((adapter / "dtvg_scale.json").read_text())
    assert about["run"] == "stage2/dtvg" and about["example_input"] == rows[0]["input"]


def test_peft_computes_our_logits_with_the_exported_prompt(trained, tmp_path, capsys):
    """The tiny random backbone's greedy predictions are mostly empty, so also compare every
    logit: same prompt rows, same place, same masks and positions as this package's forward."""
    from safetensors.torch import load_file

    from dtvg_scale.runtime.backbone import PromptedModel, load_backbone
    from dtvg_scale.data.encoding import collate_train, encode_examples
    from dtvg_scale.method.prompts import SoftPrompt

    adapter = tmp_path / "adapter"
    assert export_here(capsys, str(trained), str(adapter), "--run", "stage2/dtvg")[0] == 0
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    rows = [json.loads(line) for line in (trained / "stage2" / "dtvg" / "test_predictions.jsonl").read_text().splitlines()]
    _, peft_model = peft_predictions(adapter, [], max_new_tokens=4)
    backbone = load_backbone(base, base, {}, torch.float32)
    prompt = load_file(str(trained / "stage2" / "dtvg" / "best_prompt.safetensors"))["prompt"]
    ours = PromptedModel(backbone.model, SoftPrompt(prompt), backbone.is_encoder_decoder).eval()
    examples = [type("Example", (), {"source": r["input"], "target": r["target"]}) for r in rows[:6]]
    encoded = encode_examples(examples, backbone.tokenizer, backbone.is_encoder_decoder, 256, 4)
    batch = collate_train(encoded, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)  # right-padded
    with torch.no_grad():
        inputs = ours.prepend(prompt, batch["input_ids"], batch["attention_mask"])
        if backbone.is_encoder_decoder:
            expected = ours.backbone(**inputs, labels=batch["labels"]).logits
            got = peft_model(**batch).logits
            keep = batch["labels"] != -100
        else:
            expected = ours.backbone(**inputs).logits[:, prompt.shape[0]:]
            got = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got, keep = got[:, prompt.shape[0]:], batch["attention_mask"].bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[keep], peft_model.get_base_model()(**{k: v for k, v in batch.items()
                                                                       if k != "labels" or backbone.is_encoder_decoder}
                                                                    ).logits[keep], atol=1e-3)  # the prompt matters


def test_a_job_folder_exports_its_best_validation_run(trained, tmp_path, capsys):
    results = json.loads((trained / "results.json").read_text())
    scores = {"stage2/dtvg": results["stage2"]["dtvg"]["validation"]["mean"],
              "stage1/emb_target": results["stage1"]["emb_target"]["validation"]["mean"]}
    expected = "stage2/dtvg" if scores["stage2/dtvg"] >= scores["stage1/emb_target"] else "stage1/emb_target"
    code, _, err = export_here(capsys, str(trained), str(tmp_path / "best"))
    assert code == 0, err
    assert json.loads((tmp_path / "best" / "dtvg_scale.json").read_text())["run"] == expected
    # a run folder works as well, and replaces what is at the out folder
    code, _, err = export_here(capsys, str(trained / "stage1" / "emb_target"), str(tmp_path / "best"))
    assert code == 0, err
    assert json.loads((tmp_path / "best" / "dtvg_scale.json").read_text())["run"] == "stage1/emb_target"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # no temporary folder left beside it
    # bad folders: one line, exit 2, nothing written
    (tmp_path / "empty").mkdir()
    for folder, extra, message in [
        (tmp_path / "missing", [], "is not a folder"),
        (tmp_path / "empty", [], "is neither a train.py output folder"),
        (trained, ["--run", "stage2/oracle"], "runs with a prompt here: stage1/emb_help_a, stage1/emb_target, stage2/dtvg"),
    ]:
        code, _, err = export_here(capsys, str(folder), str(tmp_path / "out"), *extra)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
