"""GGUF files written here with GGUFWriter from tiny random Llama models with a SentencePiece vocabulary.

The same weights are saved as safetensors (tests/builders.py), so a GGUF load can be compared with
an HF load of the very same model; quantized files are compared with the dequantization of the bytes
actually written (and, for K-quants, with transformers' independent dequantizer as well).
"""

from __future__ import annotations

import pytest
import torch

from builders import code_corpus, hf_llama, train_sentencepiece, write_hf_dir
from gguf_builders import Q, random_k_blocks, sentencepiece_metadata, write_llama_gguf
from qgpt_code.checkpoints import load_model
from qgpt_code.checkpoints.gguf import chat_format
from qgpt_code.model import checkpoint_tensors
from qgpt_code.tokenizer import SentencePieceTokenizer, load_tokenizer

T = 19


def logits(loaded, seed: int = 0) -> torch.Tensor:
    """Logits (2, T, V) of a fixed random batch."""
    tokens = torch.randint(0, loaded.model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return loaded.model(tokens, torch.arange(T).expand(2, T))


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_hf, sp_proto):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_llama_gguf(path, tiny_hf[0], sentencepiece_metadata(sp_proto))
    return path


def test_f32_logits_equal_safetensors(f32_gguf, tiny_loaded):
    loaded = load_model(f32_gguf, device="cpu", dtype="float32")
    assert loaded.info.format == "gguf" and loaded.info.quantization == "F32"
    assert loaded.info.args == tiny_loaded.info.args
    assert (logits(loaded) - logits(tiny_loaded)).abs().max().item() < 1e-5


def test_q_k_rows_in_hf_order_would_be_caught(tmp_path, tiny_hf, sp_proto, tiny_loaded):
    """A file whose q/k rows were not turned into Meta's order gives other logits: the parity tests
    above and against transformers would catch a reader that permuted (or failed to) wrongly."""
    path = tmp_path / "hf-order.gguf"
    write_llama_gguf(path, tiny_hf[0], sentencepiece_metadata(sp_proto), permute_qk=False)
    wrong = load_model(path, device="cpu", dtype="float32")
    assert (logits(wrong) - logits(tiny_loaded)).abs().max().item() > 1e-3  # 100x the parity tolerance


def test_tied_embeddings(tmp_path, sp_proto):
    model = hf_llama({"tie_word_embeddings": True}, seed=3)
    write_llama_gguf(tmp_path / "tied.gguf", model, sentencepiece_metadata(sp_proto))
    from_gguf = load_model(tmp_path / "tied.gguf", device="cpu", dtype="float32")
    from_hf = load_model(write_hf_dir(model, tmp_path / "hf", sp_proto), device="cpu", dtype="float32")
    assert from_gguf.info.args.tie_embeddings
    assert (logits(from_gguf) - logits(from_hf)).abs().max().item() < 1e-5


# (type, how far a dequantized weight may stray from the float32 original, relative to max |w|)
QUANTIZABLE = [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.1)]


@pytest.mark.parametrize("qtype,tolerance", QUANTIZABLE, ids=[q.name for q, _ in QUANTIZABLE])
def test_quantized_weights_load_as_stored(tmp_path, tiny_hf, sp_proto, tiny_loaded, qtype, tolerance):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_llama_gguf(path, tiny_hf[0], sentencepiece_metadata(sp_proto), qtype)
    loaded = load_model(path, device="cpu", dtype="float32", keep_quantized=False)  # kept: tests/test_cpu_quant.py
    assert loaded.info.quantization == qtype.name
    ours, original = checkpoint_tensors(loaded.model), checkpoint_tensors(tiny_loaded.model)
    for gguf_name, meta_name in [("blk.0.attn_q.weight", "layers.0.attention.wq.weight"),
                                 ("blk.1.ffn_down.weight", "layers.1.feed_forward.w2.weight"),
                                 ("token_embd.weight", "tok_embeddings.weight"), ("output.weight", "output.weight")]:
        assert torch.equal(ours[meta_name], torch.from_numpy(stored[gguf_name])), meta_name
        error = (ours[meta_name] - original[meta_name]).abs().max() / original[meta_name].abs().max()
        assert error < tolerance, (meta_name, error.item())
    if qtype == Q.Q8_0:  # 8-bit weights barely move the logits
        assert (logits(loaded) - logits(tiny_loaded)).abs().max().item() < 0.05


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_weights_load_as_stored(tmp_path, sp_proto, qtype):
    """gguf.quants cannot quantize to K types, so the matrices are random K blocks (rows of 256)."""
    from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize

    model = hf_llama({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                      "num_key_value_heads": 2}, seed=1)
    shapes = {"token_embd.weight": (512, 256), "output.weight": (512, 256),
              "blk.0.attn_q.weight": (256, 256), "blk.0.attn_k.weight": (128, 256),
              "blk.0.attn_v.weight": (128, 256), "blk.0.attn_output.weight": (256, 256),
              "blk.0.ffn_gate.weight": (512, 256), "blk.0.ffn_up.weight": (512, 256),
              "blk.0.ffn_down.weight": (256, 512)}
    shapes.update({name.replace("blk.0", "blk.1"): shape for name, shape in shapes.items() if name.startswith("blk.0")})
    raw = {name: random_k_blocks(shape, qtype, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    stored = write_llama_gguf(tmp_path / "k.gguf", model, sentencepiece_metadata(sp_proto), qtype, raw_matrices=raw)

    loaded = load_model(tmp_path / "k.gguf", device="cpu", dtype="float32", keep_quantized=False)
    assert loaded.info.quantization == {Q.Q4_K: "Q4_K_M", Q.Q5_K: "Q5_K_M", Q.Q6_K: "Q6_K"}[qtype]
    ours = checkpoint_tensors(loaded.model)
    for gguf_name, meta_name in [("blk.0.attn_k.weight", "layers.0.attention.wk.weight"),
                                 ("blk.1.ffn_down.weight", "layers.1.feed_forward.w2.weight"),
                                 ("output.weight", "output.weight")]:
        independent = transformers_dequantize(torch.from_numpy(raw[gguf_name].reshape(-1)), int(qtype))
        assert torch.equal(ours[meta_name], torch.from_numpy(stored[gguf_name])), meta_name
        torch.testing.assert_close(ours[meta_name].reshape(-1), independent, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logits(loaded)).all()
    # Kept for the CPU kernels, K blocks become Q8_0 at load: each weight within half a step (1/254
    # of its block's largest; the step is stored in fp16, 127 steps may be 2^-11 off: +13%) of the
    # K value. (Random K blocks vary their scales wildly inside a
    # block of 32, unlike real ones, so the logits of this model are no measure.)
    kept = load_model(tmp_path / "k.gguf", device="cpu", dtype="float32")
    w2 = kept.model.layers[1].feed_forward.w2
    assert w2.formats == ["Q8_0"] and kept.model.output.formats == ["Q8_0"]
    k_values = ours["layers.1.feed_forward.w2.weight"].reshape(-1, 32)
    error = (w2.parts()[0].dequantize().reshape(-1, 32) - k_values).abs()
    assert (error <= k_values.abs().amax(1, keepdim=True) / 254 * 1.13 + 1e-6).all()
    assert torch.isfinite(logits(kept)).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_weights_stay_in_their_blocks_on_the_cpu(tmp_path, tiny_hf, sp_proto, qtype):
    """On the CPU in float32 (the default there) the file's blocks are kept: q, k and v fused into
    one part, the file's bytes; the logits follow the dequantized model's."""
    from qgpt_code.quant_blocks import BlockQuantLinear

    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_llama_gguf(path, tiny_hf[0], sentencepiece_metadata(sp_proto), qtype)
    kept = load_model(path, device="cpu", dtype="float32")
    floats = load_model(path, device="cpu", dtype="float32", keep_quantized=False)
    wqkv = kept.model.layers[0].attention.wqkv
    assert isinstance(wqkv, BlockQuantLinear) and wqkv.formats == [qtype.name]
    assert torch.equal(wqkv.parts()[0].dequantize(), floats.model.layers[0].attention.wqkv.weight)
    assert torch.equal(kept.model.output.parts()[0].dequantize(), torch.from_numpy(stored["output.weight"]))
    assert torch.nn.functional.cosine_similarity(logits(kept).flatten(1), logits(floats).flatten(1)).min() > 0.9999
    with pytest.raises(Exception, match="only on the CPU in float32"):
        load_model(path, device="cpu", dtype="bfloat16", keep_quantized=True)


def test_runtime_dtype(f32_gguf):
    loaded = load_model(f32_gguf, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert torch.isfinite(logits(loaded)).all()


# --- the SentencePiece tokenizer rebuilt from GGUF metadata -----------------------------------------


@pytest.fixture(scope="module")
def infill_proto() -> bytes:
    """A Code-Llama-like vocabulary: byte fallback plus the four user-defined infilling pieces."""
    return train_sentencepiece(600, infill_pieces=True)


@pytest.fixture(scope="module")
def infill_gguf(tmp_path_factory, infill_proto):
    model = hf_llama({"vocab_size": 600}, seed=2)
    path = tmp_path_factory.mktemp("infill") / "code-tiny.gguf"
    write_llama_gguf(path, model, sentencepiece_metadata(infill_proto))
    return path


def test_sentencepiece_tokenizer_equals_the_original(infill_gguf, infill_proto):
    original, rebuilt = SentencePieceTokenizer(infill_proto), load_tokenizer(infill_gguf)
    assert (rebuilt.vocab_size, rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (
        original.vocab_size, original.bos_id, original.eos_id, original.pad_id)
    lines = code_corpus() + ["", " ", "  two spaces", "x\n\n\ty", "数字 12345 🙂 ÿ", "a ▁<PRE> b <SUF> c"]
    for text in lines + ["\n".join(lines)]:
        ids = rebuilt.encode(text, bos=True)
        assert ids == original.encode(text, bos=True), text
        assert rebuilt.decode(ids) == original.decode(ids)
    for piece in ("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>", "<0x0A>", "▁def"):
        assert rebuilt.piece_to_id(piece) == original.piece_to_id(piece) is not None
    assert rebuilt.piece_to_id("not-a-piece") is None


def test_sentencepiece_special_tokens(infill_gguf, infill_proto):
    tok = load_tokenizer(infill_gguf)
    assert tok.add_bos and tok.eos_id in tok.eog_ids and tok.piece_to_id("▁<EOT>") in tok.eog_ids
    text = "def f():\n    return 1"
    assert tok.encode_special(text) == tok.encode(text)
    assert tok.encode_special(f"<s>{text}</s>") == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert tok.bos_id not in tok.encode(f"<s>{text}")  # plain text never yields control tokens


def test_add_bos_flag_follows_the_file(tmp_path, sp_proto):
    write_llama_gguf(tmp_path / "nobos.gguf", hf_llama({}), sentencepiece_metadata(sp_proto, add_bos=False))
    assert load_tokenizer(tmp_path / "nobos.gguf").add_bos is False


# --- chat format rule ---------------------------------------------------------------------------------

LLAMA_VOCAB = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["t"] * 32000}
CODE_VOCAB = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["t"] * 32016}
CHATML = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("metadata,expected", [
    ({**LLAMA_VOCAB, "general.name": "Llama 2 7B Chat", "tokenizer.chat_template": "[INST]..."}, ("llama2", None)),
    ({**CODE_VOCAB, "general.basename": "CodeLlama", "general.name": "codellama-13b-instruct"}, ("llama2", None)),
    ({**CODE_VOCAB, "general.name": "CodeLlama 70B Instruct", "tokenizer.chat_template": CHATML}, ("template", CHATML)),
    ({**LLAMA_VOCAB, "general.name": "some fine-tune", "tokenizer.chat_template": CHATML}, ("template", CHATML)),
    ({**CODE_VOCAB}, ("llama2", None)),  # an old conversion with neither name nor template
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["t"] * 49152,
      "general.name": "llama2-lookalike"}, ("template", None)),  # not Llama's vocabulary: no known format
])
def test_chat_format_rule(metadata, expected):
    assert chat_format(metadata) == expected


@pytest.mark.parametrize("file_type", [None, 1024], ids=["absent", "GUESSED"])
def test_quantization_without_a_stated_file_type(tmp_path, tiny_hf, sp_proto, file_type):
    """The commonest matrix type is reported when general.file_type does not say."""
    from qgpt_code.checkpoints.gguf import GGUFFile, quantization

    path = tmp_path / "guessed.gguf"
    write_llama_gguf(path, tiny_hf[0], sentencepiece_metadata(sp_proto), Q.Q8_0, file_type=file_type)
    assert GGUFFile(path).get("general.file_type") == file_type
    assert quantization(GGUFFile(path)) == "Q8_0"
