"""Checkpoint loading: formats recognised, tokenizers found, bad files named in one-line errors."""

import json
import shutil

import pytest
import torch
from builders import meta_params, train_sentencepiece, write_meta_dir

from qgpt_code import load_model
from qgpt_code.checkpoints import detect_format
from qgpt_code.errors import CheckpointError
from qgpt_code.model import checkpoint_tensors


@pytest.fixture()
def meta_dir(tmp_path, tiny_loaded, sp_proto):
    params = {**meta_params(tiny_loaded.info.args), "multiple_of": 32}
    return write_meta_dir(checkpoint_tensors(tiny_loaded.model), params, tmp_path / "meta", sp_proto, n_shards=2)


def test_formats_are_recognised(tmp_path, meta_dir, tiny_hf):
    assert detect_format(meta_dir) == "meta"
    assert detect_format(tiny_hf[1]) == "hf"
    with pytest.raises(CheckpointError, match="no such file"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        detect_format(tmp_path)


def test_meta_tokenizer_is_found_one_level_up(tmp_path, meta_dir, sp_proto):
    nested = tmp_path / "llama-2-tiny"
    shutil.move(meta_dir, nested)
    (nested / "tokenizer.model").rename(tmp_path / "tokenizer.model")  # Meta's download layout
    assert load_model(nested, device="cpu").tokenizer.vocab_size == 512


def test_corrupted_shard_is_named(meta_dir):
    (meta_dir / "consolidated.01.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot read checkpoint shard"):
        load_model(meta_dir, device="cpu")


def test_shape_mismatch_names_file_and_tensor(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "n_heads": 2, "n_kv_heads": 2}))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth \(\+1 more shards, merged\): tensor 'layers\.0\.attention\.wk\.weight' has shape"):
        load_model(meta_dir, device="cpu")


def test_unknown_and_missing_tensors(meta_dir):
    for rank in (0, 1):
        path = meta_dir / f"consolidated.0{rank}.pth"
        shard = torch.load(path, weights_only=True)
        shard["layers.0.attention.bias"] = torch.zeros(4)
        del shard["norm.weight"]
        torch.save(shard, path)
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.bias'"):
        load_model(meta_dir, device="cpu")


def test_missing_tensor_is_named(meta_dir):
    for rank in (0, 1):
        path = meta_dir / f"consolidated.0{rank}.pth"
        shard = torch.load(path, weights_only=True)
        del shard["norm.weight"]
        torch.save(shard, path)
    with pytest.raises(CheckpointError, match="missing tensor.*norm.weight"):
        load_model(meta_dir, device="cpu")


def test_pickled_code_in_a_checkpoint_is_refused(meta_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, meta_dir / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint shard"):
        load_model(meta_dir, device="cpu")


def test_tokenizer_for_another_vocabulary_is_refused(tmp_path, tiny_hf):
    small = tmp_path / "small.model"
    small.write_bytes(train_sentencepiece(600))
    with pytest.raises(CheckpointError, match="tokenizer has 600 tokens but the model's vocabulary has 512"):
        load_model(tiny_hf[1], device="cpu", tokenizer=small)


def test_hf_missing_weights_and_unknown_tensor(tmp_path, tiny_hf):
    broken = tmp_path / "hf"
    shutil.copytree(tiny_hf[1], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(broken, device="cpu")
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(broken / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="extra.safetensors: unknown tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(broken, device="cpu")


def test_bfloat16_load_keeps_dtype_and_close_logits(tiny_hf, tiny_loaded):
    bf16 = load_model(tiny_hf[1], device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    tokens = torch.arange(3, 20)[None]
    positions = torch.arange(17)[None]
    with torch.no_grad():
        diff = (bf16.model(tokens, positions) - tiny_loaded.model(tokens, positions)).abs().max().item()
    assert diff < 0.1
