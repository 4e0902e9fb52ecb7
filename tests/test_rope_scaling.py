"""HF `rope_scaling`: type linear (position interpolation, as long-context Llama 2 fine-tunes use)
matches transformers; any other type is refused with an error naming it."""

from __future__ import annotations

import json

import pytest
import torch
from builders import hf_llama, write_hf_dir

from qgpt_code import load_model
from qgpt_code.errors import CheckpointError
from qgpt_code.kv_cache import KVCache

TOLERANCE = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LINEAR = {"rope_type": "linear", "factor": 4.0}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, sp_proto):
    """(transformers model with linear rope scaling x4, its safetensors directory)."""
    hf = hf_llama({"rope_scaling": LINEAR, "max_position_embeddings": 1024}, seed=4)
    assert hf.config.to_dict()["rope_parameters"]["rope_type"] == "linear"
    return hf, write_hf_dir(hf, tmp_path_factory.mktemp("rope_linear"), sp_proto)


def tokens_of(length: int) -> torch.Tensor:
    return torch.randint(3, 512, (2, length), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_linear_rope_scaling_matches_transformers(scaled, device):
    hf, path = scaled
    ours = load_model(path, device=device, dtype="float32")
    assert ours.model.args.rope_scaling_factor == 4.0
    tokens = tokens_of(300)  # past the unscaled 256 of the other tiny models
    with torch.no_grad():
        expected = hf.to(device)(tokens.to(device)).logits.float()
        got = ours.model(tokens.to(device), torch.arange(300, device=device).expand(2, 300))
        # and through the paged cache, a prompt chunk after a cached prefix
        cache = KVCache(ours.model.args, 38, device=device)
        table = torch.arange(38, device=device).view(2, 19)  # each row its own 19 blocks
        ours.model(tokens[:, :200].to(device), torch.arange(200, device=device).expand(2, 200), cache,
                   tables=table, kv_len=200, causal_from=0)
        rest = ours.model(tokens[:, 200:].to(device), torch.arange(200, 300, device=device).expand(2, 100), cache,
                          tables=table, kv_len=300, causal_from=200)
    hf.to("cpu")
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (rest - expected[:, 200:]).abs().max().item() <= TOLERANCE


def test_without_the_scaling_the_logits_differ(scaled, tmp_path):
    """The check above can fail: the same weights with the scaling dropped are far from transformers'."""
    hf, path = scaled
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    dropped = copy_checkpoint(path, tmp_path, config)
    ours = load_model(dropped, device="cpu", dtype="float32")
    assert ours.model.args.rope_scaling_factor == 1.0
    tokens = tokens_of(300)
    with torch.no_grad():
        difference = (ours.model(tokens, torch.arange(300).expand(2, 300)) - hf(tokens).logits).abs().max().item()
    assert difference > 20 * TOLERANCE


@pytest.mark.parametrize("scaling", [
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
])
def test_other_rope_scaling_types_are_refused_by_name(scaled, tmp_path, scaling):
    _, path = scaled
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_scaling", None)
    config.update(scaling)
    kind = next(iter(scaling.values())).get("rope_type") or next(iter(scaling.values())).get("type")
    with pytest.raises(CheckpointError, match=f"rope_scaling type '{kind}' is not supported"):
        load_model(copy_checkpoint(path, tmp_path, config), device="cpu", dtype="float32")


def copy_checkpoint(path, directory, config: dict):
    """The checkpoint at `path` with another config.json, in `directory`."""
    for file in path.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_gguf_file_with_linear_scaling_matches_transformers(scaled, tmp_path, sp_proto):
    from gguf_builders import sentencepiece_metadata, write_llama_gguf

    hf, _ = scaled
    path = tmp_path / "linear.gguf"
    write_llama_gguf(path, hf, sentencepiece_metadata(sp_proto),
                     extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    ours = load_model(path, device="cpu", dtype="float32")
    assert ours.model.args.rope_scaling_factor == 4.0
    tokens = tokens_of(300)
    with torch.no_grad():
        difference = (ours.model(tokens, torch.arange(300).expand(2, 300)) - hf(tokens).logits).abs().max().item()
    assert difference <= TOLERANCE
