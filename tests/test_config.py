import json

import pytest

from qgpt_code.config import PRESETS, ModelArgs, ffn_hidden_dim, preset

# Published FFN widths (HF intermediate_size) of each model.
PUBLISHED_FFN = {"llama-2-7b": 11008, "llama-2-13b": 13824, "llama-2-70b": 28672,
                 "codellama-7b": 11008, "codellama-13b": 13824, "codellama-34b": 22016}
PUBLISHED_PARAMS_B = {"llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "codellama-34b": 33.74}


@pytest.mark.parametrize("name", sorted(PUBLISHED_FFN))
def test_preset_ffn_width_matches_meta_formula_and_published_size(name):
    args = preset(name)
    assert args.hidden_dim == PUBLISHED_FFN[name]
    assert args.hidden_dim == ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_preset_parameter_counts(name):
    assert PRESETS[name].n_params / 1e9 == pytest.approx(PUBLISHED_PARAMS_B[name], abs=0.01)


def test_code_llama_presets_have_rope_theta_1e6_and_infill_vocab():
    for name in ("codellama-7b", "codellama-13b"):
        assert PRESETS[name].rope_theta == 1e6 and PRESETS[name].vocab_size == 32016
    assert PRESETS["llama-2-70b"].n_kv_heads == 8 and PRESETS["llama-2-7b"].n_kv_heads == 32


def test_from_meta_params_json_of_llama_2_7b():
    params = json.loads('{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, '
                        '"norm_eps": 1e-05, "vocab_size": -1}')
    args = ModelArgs.from_meta_params(params, vocab_size=32000)
    assert args == PRESETS["llama-2-7b"]


def test_from_hf_config():
    args = ModelArgs.from_hf_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "vocab_size": 99, "intermediate_size": 100,
                                     "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True})
    assert (args.n_kv_heads, args.hidden_dim, args.head_dim, args.rope_theta, args.tie_embeddings) == (2, 100, 16, 1e6, True)


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("llama-3")
