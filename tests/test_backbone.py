"""Prompt prepending for both families, padding-invariant generation, data batching."""

import pytest
import torch

from dtvg_scale.data import random_world
from dtvg_scale.runtime.backbone import PromptedModel, load_backbone, resolve_model_path
from dtvg_scale.data.encoding import collate_generate, collate_train, encode_examples
from dtvg_scale.runtime.sampling import eval_shard, global_batch_indices, rank_micro_batches
from dtvg_scale.method.prompts import SoftPrompt
from dtvg_scale.method.transfer import transfer_gains
from dtvg_scale.runtime.transfer_losses import target_losses


@pytest.fixture(scope="module", params=["t5", "llama"])
def prompted(request, tmp_path_factory):
    path = resolve_model_path(f"embedded:{request.param}", tmp_path_factory.mktemp("bb"), 64, 2)
    backbone = load_backbone(path, request.param, {}, torch.float32)
    torch.manual_seed(0)
    prompt = SoftPrompt(torch.randn(4, backbone.hidden_size))
    return PromptedModel(backbone.model, prompt, backbone.is_encoder_decoder), backbone


def test_backbone_is_frozen_and_only_the_prompt_trains(prompted):
    model, _ = prompted
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.prompt"]


def test_prompt_is_prepended_with_mask_and_ignored_labels(prompted):
    model, backbone = prompted
    examples = encode_examples(random_world.embedded_task("emb_target", n_train=3).train, backbone.tokenizer,
                               backbone.is_encoder_decoder, 256, 4)
    batch = collate_train(examples, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)
    inputs = model.prepend(model.prompt.prompt, batch["input_ids"], batch["attention_mask"])
    assert inputs["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] + 4
    assert inputs["attention_mask"][:, :4].all()
    torch.testing.assert_close(inputs["inputs_embeds"][0, :4], model.prompt.prompt)
    loss, _ = model(**batch)
    loss.backward()
    assert torch.isfinite(loss) and model.prompt.prompt.grad.abs().sum() > 0
    if not backbone.is_encoder_decoder:  # loss only on the target: input and padding are -100
        for example, labels in zip(examples, batch["labels"]):
            assert (labels[: len(example.source_ids)] == -100).all()
            assert labels[len(example.source_ids):len(example.source_ids) + len(example.target_ids)].tolist() == list(example.target_ids)


def test_training_loss_is_transformers_own_loss(prompted):
    # decoder-only: the loss reads only the logits that score a label token (logits_to_keep),
    # and must equal the full model's own causal-LM loss
    model, backbone = prompted
    examples = encode_examples(random_world.embedded_task("emb_target", n_train=5).train, backbone.tokenizer,
                               backbone.is_encoder_decoder, 256, 4)
    batch = collate_train(examples, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)
    model.eval()
    loss, _ = model(**batch)
    inputs, labels = model.prepend_with_labels(model.prompt.prompt, batch["input_ids"], batch["attention_mask"],
                                               batch["labels"])
    torch.testing.assert_close(loss, backbone.model(**inputs, labels=labels).loss, rtol=1e-6, atol=1e-6)
    assert model.keeps_label_logits == (not backbone.is_encoder_decoder)
    if model.keeps_label_logits:
        logits, targets = model.label_logits(inputs, labels)
        assert logits.shape[1] < inputs["inputs_embeds"].shape[1] // 2 and (targets != -100).any(dim=0).all()


def test_generation_does_not_depend_on_padding(prompted):
    model, backbone = prompted
    task = random_world.embedded_task("emb_target", n_test=6)
    examples = encode_examples(task.test, backbone.tokenizer, backbone.is_encoder_decoder, 256, 4)
    assert len({len(e.source_ids) for e in examples}) > 1  # different lengths, so padding happens
    model.eval()
    batch = collate_generate(examples, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)
    together = model.generate(model.prompt.prompt, batch["input_ids"], batch["attention_mask"], 4, synced=False)
    for i, example in enumerate(examples):
        alone = collate_generate([example], backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)
        single = model.generate(model.prompt.prompt, alone["input_ids"], alone["attention_mask"], 4, synced=False)
        decode = lambda ids: backbone.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        assert decode(together[i]) == decode(single[0])


def test_transfer_losses_are_the_training_loss_per_token_for_every_prompt(prompted):
    # target_losses over several batches = the training forward's loss over one batch holding
    # every example (HF averages over all label tokens), for each prompt
    model, backbone = prompted
    examples = encode_examples(random_world.embedded_task("emb_target", n_train=7).train, backbone.tokenizer,
                               backbone.is_encoder_decoder, 256, 4)
    torch.manual_seed(1)
    prompts = torch.randn(3, 4, backbone.hidden_size)
    losses = target_losses(model, prompts, examples, backbone.tokenizer.pad_token_id, 3, 0, 1)
    batch = collate_train(examples, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder)
    model.eval()
    for prompt, loss in zip(prompts, losses, strict=True):
        expected, _ = PromptedModel(model.backbone, SoftPrompt(prompt), backbone.is_encoder_decoder)(**batch)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(transfer_gains(losses[0], losses[1:]), losses[0] - losses[1:])
    assert len(set(losses.tolist())) == 3


def test_batches_are_a_function_of_seed_and_step():
    a = global_batch_indices(10, 4, 7, seed=3)
    assert a == global_batch_indices(10, 4, 7, seed=3) and a != global_batch_indices(10, 4, 7, seed=4)
    epoch = sum((global_batch_indices(10, 5, s, seed=0) for s in range(2)), [])
    assert sorted(epoch) == list(range(10))  # one epoch visits every example once
    micro = rank_micro_batches(list(range(8)), rank=1, world_size=2, accumulation=2)
    assert micro == [[2, 3], [6, 7]]
    indices, valid = eval_shard(5, rank=1, world_size=2)
    assert indices[:2] == [1, 3] and valid == [True, True, False]
    assert len(eval_shard(5, 0, 2)[0]) == len(indices)  # equal batch counts on every rank


def test_likelihood_predictions_pick_the_label_with_the_lowest_training_loss(prompted):
    from dtvg_scale.data.encoding import EncodedExample, encode_targets
    from dtvg_scale.runtime.evaluation import likelihood_predictions

    model, backbone = prompted
    examples = encode_examples(random_world.embedded_task("emb_target", n_test=5).test, backbone.tokenizer,
                               backbone.is_encoder_decoder, 256, 4)
    labels = ("0", "1", "w03")  # a multi-token label too
    label_ids = encode_targets(labels, backbone.tokenizer, backbone.is_encoder_decoder, 4)
    pad = backbone.tokenizer.pad_token_id
    model.eval()
    predicted = likelihood_predictions(model, model.prompt.prompt.detach(), examples, label_ids, labels, pad, 4, 0, 1)
    for example, prediction in zip(examples, predicted, strict=True):
        losses = []
        for ids, text in zip(label_ids, labels, strict=True):  # summed over the label's tokens, eos included
            batch = collate_train([EncodedExample(example.source_ids, ids, text)], pad, backbone.is_encoder_decoder)
            with torch.no_grad():
                losses.append(float(model(**batch)[0]) * len(ids))
        assert prediction == labels[min(range(len(labels)), key=losses.__getitem__)]


def test_label_losses_read_each_input_once_and_equal_one_forward_per_pair(prompted):
    """The shared-input scoring (T5: one encoder pass; LLaMA: one key/value cache over prompt and
    input) gives each (example, label) the summed loss a forward of that pair alone gives."""
    from dtvg_scale.data.encoding import EncodedExample, collate_inputs, encode_targets

    model, backbone = prompted
    examples = encode_examples(random_world.embedded_task("emb_target", n_test=6).test, backbone.tokenizer,
                               backbone.is_encoder_decoder, 256, 4)
    assert len({len(e.source_ids) for e in examples}) > 1  # inputs of different lengths: padding in the middle
    labels = ("0", "w03 w05", "1")  # labels of different lengths
    label_ids = encode_targets(labels, backbone.tokenizer, backbone.is_encoder_decoder, 4)
    assert len({len(ids) for ids in label_ids}) > 1
    pad, prompt = backbone.tokenizer.pad_token_id, model.prompt.prompt.detach()
    model.eval()
    inputs = collate_inputs(examples, pad)
    shared = model.label_losses(prompt, inputs["input_ids"], inputs["attention_mask"], label_ids)
    pairs = [EncodedExample(e.source_ids, ids, text) for e in examples for ids, text in zip(label_ids, labels)]
    batch = collate_train(pairs, pad, backbone.is_encoder_decoder)
    alone, _ = model.example_losses(prompt, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(shared, alone.view(len(examples), len(labels)), rtol=1e-5, atol=1e-5)
