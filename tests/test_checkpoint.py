"""Safetensors serialisation of DeepSpeed state: round trip, allowlist, no pickle."""

import pickle
from collections import OrderedDict

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from dtvg_scale.runtime.checkpoint import load_state, load_tensors, save_state, save_tensors


def test_state_round_trip(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "module": OrderedDict(prompt=torch.randn(3, 4), scale=torch.ones(3, dtype=torch.bfloat16)),
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": shared[:3]}, 1: {"exp_avg": shared[3:]}},
                      "param_groups": [{"lr": 0.3, "betas": (0.9, 0.999), "params": [0, 1], "name": "prompt"}]},
        "zero_stage": ZeroStageEnum.weights,
        "loss_scaler": LossScaler(1.0),
        "shapes": [OrderedDict(prompt=torch.Size([3, 4]))],
        "dtype": torch.bfloat16,
        "best": float("-inf"),
        "none": None,
        "lr_lambdas": [None],
    }
    path = tmp_path / "mp_rank_00_model_states.pt"
    save_state(state, path)
    back = load_state(path)
    assert torch.equal(back["module"]["prompt"], state["module"]["prompt"])
    assert back["module"]["scale"].dtype == torch.bfloat16
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    assert torch.equal(back["optimizer"]["state"][1]["exp_avg"], torch.arange(3.0, 6.0))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["zero_stage"] is ZeroStageEnum.weights
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 1.0
    assert back["shapes"][0]["prompt"] == torch.Size([3, 4])
    assert back["dtype"] is torch.bfloat16 and back["best"] == float("-inf") and back["none"] is None
    with pytest.raises(pickle.UnpicklingError):  # the file is not a pickle at all
        torch.load(path, weights_only=False)


def test_dynamic_loss_scaler_round_trips(tmp_path):
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=10, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    save_state({"s": scaler}, tmp_path / "x.pt")
    back = load_state(tmp_path / "x.pt")["s"]
    assert type(back) is DynamicLossScaler and back.cur_scale == 2.0**16 and back.scale_window == 10


def test_unknown_objects_are_refused_at_save_time(tmp_path):
    class Whatever:
        pass

    with pytest.raises(TypeError, match="cannot checkpoint"):
        save_state({"x": Whatever()}, tmp_path / "bad.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_artifacts_keep_metadata(tmp_path):
    save_tensors(tmp_path / "p.safetensors", {"prompt": torch.ones(2, 2)}, {"task": "rte", "score": 0.5})
    tensors, meta = load_tensors(tmp_path / "p.safetensors")
    assert torch.equal(tensors["prompt"], torch.ones(2, 2)) and meta == {"task": "rte", "score": 0.5}
