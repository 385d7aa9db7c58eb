from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.train.checkpoint import atomic_write, load_model, load_state, read_info, save_model, save_state


def info_for(model):
    return {"model": model.cfg.to_dict(), "classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_digits")
    torch.nn.init.normal_(model.head.weight)
    save_model(tmp_path / "m.safetensors", model.state_dict(), info_for(model))
    loaded, info = load_model(tmp_path / "m.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert info["classes"] == [str(i) for i in range(10)] and info["model"] == model.cfg.to_dict()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    (tmp_path / "m.safetensors").rename(tmp_path / "best.safetensors")
    assert read_info(tmp_path) == info  # a run folder resolves to its best checkpoint


def test_a_checkpoint_that_does_not_fit_is_explained(tmp_path):
    model = create_model("vit_digits")
    info = info_for(model)
    state = model.state_dict()
    state["head.weight"] = torch.zeros(3, 128)
    save_model(tmp_path / "bad.safetensors", state, info)
    with pytest.raises(VitkitError, match="head.weight"):
        load_model(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(VitkitError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(VitkitError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(VitkitError, match="no best"):
        load_model(_empty_dir(tmp_path))


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def test_an_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("previous")

    def write(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_state_round_trip_without_pickled_objects(tmp_path):
    state = {"epoch": 3, "rng": torch.get_rng_state(), "nested": {"a": torch.arange(3)}, "history": "[]"}
    save_state(tmp_path / "state.pt", state)
    back = load_state(tmp_path / "state.pt")
    assert back["epoch"] == 3 and torch.equal(back["rng"], state["rng"])
    torch.save({"obj": Path("x")}, tmp_path / "evil.pt")  # an arbitrary object needs full unpickling
    with pytest.raises(VitkitError, match="unreadable"):
        load_state(tmp_path / "evil.pt")


def test_weights_file_is_plain_safetensors(tmp_path):
    model = create_model("vit_digits")
    save_model(tmp_path / "m.safetensors", model.state_dict(), info_for(model))
    assert set(load_file(tmp_path / "m.safetensors")) == set(model.state_dict())
