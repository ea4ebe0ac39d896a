"""ModelConfig.from_hf on real-world config.json shapes, round trips, and the validation of every config."""

import json
import math

import pytest

from kiln.config import BuildConfig, ModelConfig, RopeConfig, SamplingParams
from kiln.errors import KilnError

# ---- config.json dicts, as published (trimmed to the keys that matter) -------------------------------

def llama2_7b():
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def llama31_8b_old():
    """transformers 4.x form: rope_theta at top level, rope_scaling with rope_type llama3."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": dict(LLAMA3_SCALING),
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }


def llama31_8b_new():
    """transformers 5 form: everything about RoPE inside rope_parameters, no top-level rope_theta."""
    hf = llama31_8b_old()
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=500000.0)
    return hf


def mistral_7b_v01():
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def mistral_nemo():
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 5120,
        "head_dim": 128,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "vocab_size": 131072,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 1024000,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def qwen2_7b(**overrides):
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    hf.update(overrides)
    return hf


# ---- from_hf --------------------------------------------------------------------------------------------

def test_llama2():
    c = ModelConfig.from_hf(llama2_7b())
    assert c.architecture == "LlamaForCausalLM"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (32000, 4096, 11008)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 32, 128)
    assert c.rms_norm_eps == 1e-5
    assert c.rope == RopeConfig(theta=10000.0, rope_type="default", original_max_position_embeddings=4096)
    assert c.max_position_embeddings == 4096
    assert c.qkv_bias is False and c.tie_word_embeddings is False
    assert c.sliding_windows == (0,) * 32
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)


def test_num_kv_heads_defaults_to_num_heads():
    hf = llama2_7b()
    del hf["num_key_value_heads"]
    assert ModelConfig.from_hf(hf).num_kv_heads == 32


def test_architecture_from_model_type_when_architectures_missing():
    hf = llama2_7b()
    del hf["architectures"]
    assert ModelConfig.from_hf(hf).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("make", [llama31_8b_old, llama31_8b_new], ids=["rope_scaling", "rope_parameters"])
def test_llama31_rope_llama3(make):
    c = ModelConfig.from_hf(make())
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 8, 128, 128256)
    assert c.rope.rope_type == "llama3"
    assert c.rope.theta == 500000.0
    assert c.rope.factor == 8.0
    assert c.rope.low_freq_factor == 1.0
    assert c.rope.high_freq_factor == 4.0
    assert c.rope.original_max_position_embeddings == 8192
    assert c.max_position_embeddings == 131072
    assert c.bos_token_id == 128000
    assert c.eos_token_id == 128001  # first of the list


def test_llama31_both_forms_agree():
    assert ModelConfig.from_hf(llama31_8b_old()) == ModelConfig.from_hf(llama31_8b_new())


def test_legacy_type_key_linear_rope():
    hf = llama2_7b()
    hf["rope_scaling"] = {"type": "linear", "factor": 2.0}
    c = ModelConfig.from_hf(hf)
    assert c.rope.rope_type == "linear" and c.rope.factor == 2.0 and c.rope.theta == 10000.0


def test_rope_parameters_default_type_new_form():
    hf = llama2_7b()
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    c = ModelConfig.from_hf(hf)
    assert c.rope.rope_type == "default" and c.rope.theta == 250000.0


def test_mistral_v01_sliding_window_all_layers():
    c = ModelConfig.from_hf(mistral_7b_v01())
    assert c.architecture == "MistralForCausalLM"
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (32, 8, 128)
    assert c.sliding_windows == (4096,) * 32
    assert c.qkv_bias is False


def test_mistral_nemo_explicit_head_dim():
    c = ModelConfig.from_hf(mistral_nemo())
    assert c.hidden_size == 5120 and c.num_heads == 32
    assert c.head_dim == 128  # not 5120 // 32 == 160
    assert c.num_layers == 40 and c.num_kv_heads == 8
    assert c.sliding_windows == (0,) * 40
    assert c.rope.theta == 1000000.0


def test_head_dim_null_falls_back_to_hidden_over_heads():
    hf = mistral_nemo()
    hf["head_dim"] = None
    assert ModelConfig.from_hf(hf).head_dim == 160


def test_qwen2_bias_and_no_window_when_use_sliding_window_false():
    c = ModelConfig.from_hf(qwen2_7b())
    assert c.architecture == "Qwen2ForCausalLM"
    assert c.qkv_bias is True
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (28, 4, 128)
    assert c.sliding_windows == (0,) * 28
    assert c.rope.theta == 1000000.0
    assert c.eos_token_id == 151645


def test_qwen2_use_sliding_window_true_with_max_window_layers():
    # HF Qwen2: layers with index >= max_window_layers use sliding attention, the first ones full.
    c = ModelConfig.from_hf(
        qwen2_7b(num_hidden_layers=6, use_sliding_window=True, sliding_window=4096, max_window_layers=2)
    )
    assert c.sliding_windows == (0, 0, 4096, 4096, 4096, 4096)


def test_qwen2_use_sliding_window_true_max_window_layers_equals_layers_means_no_window():
    c = ModelConfig.from_hf(qwen2_7b(use_sliding_window=True, sliding_window=4096, max_window_layers=28))
    assert c.sliding_windows == (0,) * 28


def test_qwen2_explicit_layer_types():
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    c = ModelConfig.from_hf(
        qwen2_7b(num_hidden_layers=4, use_sliding_window=True, sliding_window=512, layer_types=types)
    )
    assert c.sliding_windows == (0, 512, 0, 512)


def test_qwen2_layer_types_ignored_when_use_sliding_window_false():
    c = ModelConfig.from_hf(
        qwen2_7b(num_hidden_layers=2, sliding_window=512, layer_types=["sliding_attention"] * 2)
    )
    assert c.sliding_windows == (0, 0)


def test_llama_attention_bias_sets_qkv_bias():
    hf = llama2_7b()
    hf["attention_bias"] = True
    assert ModelConfig.from_hf(hf).qkv_bias is True


def test_tied_embeddings():
    hf = llama2_7b()
    hf["tie_word_embeddings"] = True
    assert ModelConfig.from_hf(hf).tie_word_embeddings is True


# ---- unsupported values raise KilnError naming the value ----------------------------------------------

@pytest.mark.parametrize("arch", ["GemmaForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture(arch):
    hf = llama2_7b()
    hf["architectures"] = [arch]
    with pytest.raises(KilnError) as e:
        ModelConfig.from_hf(hf)
    assert arch in str(e.value)


def test_unsupported_model_type_without_architectures():
    hf = llama2_7b()
    del hf["architectures"]
    hf["model_type"] = "phi3"
    with pytest.raises(KilnError) as e:
        ModelConfig.from_hf(hf)
    assert "phi3" in str(e.value)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(rope_type, form):
    hf = llama2_7b()
    hf[form] = {"rope_type": rope_type, "factor": 4.0}
    with pytest.raises(KilnError) as e:
        ModelConfig.from_hf(hf)
    assert rope_type in str(e.value)


def test_unsupported_rope_type_legacy_key():
    hf = llama2_7b()
    hf["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(KilnError, match="dynamic"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_unsupported_hidden_act(act):
    hf = llama2_7b()
    hf["hidden_act"] = act
    with pytest.raises(KilnError) as e:
        ModelConfig.from_hf(hf)
    assert act in str(e.value)


def test_mlp_bias_rejected():
    hf = llama2_7b()
    hf["mlp_bias"] = True
    with pytest.raises(KilnError, match="mlp_bias"):
        ModelConfig.from_hf(hf)


# ---- round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make", [llama2_7b, llama31_8b_old, llama31_8b_new, mistral_7b_v01, mistral_nemo, qwen2_7b]
)
def test_model_config_round_trip(make):
    c = ModelConfig.from_hf(make())
    assert ModelConfig.from_dict(c.to_dict()) == c
    # Through JSON as an engine file stores it: tuples become lists and must come back as tuples.
    back = ModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    assert isinstance(back.sliding_windows, tuple) and isinstance(back.rope, RopeConfig)


def test_model_config_round_trip_keeps_per_layer_windows():
    c = ModelConfig.from_hf(
        qwen2_7b(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    )
    assert c.sliding_windows == (0, 64, 64, 64)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))).sliding_windows == (0, 64, 64, 64)


def test_model_config_default_sliding_windows_per_layer():
    c = ModelConfig("LlamaForCausalLM", 10, 8, 16, 3, 2, 1, 4)
    assert c.sliding_windows == (0, 0, 0)


def test_build_config_round_trip_and_unknown_keys_ignored():
    b = BuildConfig(max_batch_size=3, max_input_len=100, max_seq_len=200, max_num_tokens=64, tokens_per_block=16)
    assert BuildConfig.from_dict(b.to_dict()) == b
    assert BuildConfig.from_dict(dict(b.to_dict(), something_new=1)) == b


# ---- BuildConfig validation -----------------------------------------------------------------------------

BUILD_FIELDS = ["max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"]


@pytest.mark.parametrize("name", BUILD_FIELDS)
@pytest.mark.parametrize("value", [0, -1, 1.5, "8"])
def test_build_config_rejects_non_positive_or_non_int(name, value):
    with pytest.raises(KilnError) as e:
        BuildConfig(**{name: value})
    assert f"--{name}" in str(e.value)


def test_build_config_rejects_input_longer_than_seq():
    with pytest.raises(KilnError) as e:
        BuildConfig(max_input_len=300, max_seq_len=200)
    msg = str(e.value)
    assert "--max_input_len" in msg and "--max_seq_len" in msg
    assert "300" in msg and "200" in msg


def test_build_config_accepts_equal_input_and_seq():
    b = BuildConfig(max_input_len=200, max_seq_len=200)
    assert b.max_input_len == b.max_seq_len == 200


# ---- SamplingParams validation --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,value",
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_sampling_params_rejects(name, value):
    with pytest.raises(KilnError) as e:
        SamplingParams(**{name: value})
    assert name in str(e.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(top_p=1.0),
        dict(top_p=0.01),
        dict(top_k=0),
        dict(top_k=50),
        dict(max_tokens=1),
        dict(repetition_penalty=0.5),
        dict(presence_penalty=-1.0, frequency_penalty=2.0),
    ],
)
def test_sampling_params_accepts(kwargs):
    SamplingParams(**kwargs)


def test_sampling_params_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8).greedy
    assert not SamplingParams(temperature=1.0, top_k=2).greedy
