"""AdapterProbe: RunFacts read from live PEFT models built from tiny configs."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_doctor.facts import RunFacts
from lora_doctor.probes.model import read_facts


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )


def test_llama_layers_and_counts() -> None:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    facts = RunFacts()
    read_facts(model, facts)
    trainable, total = model.get_nb_trainable_parameters()
    assert facts.has_lora is True
    assert facts.lora_params == trainable
    assert facts.base_params == total - trainable
    assert facts.trainable_base == []
    q = next(lf for lf in facts.layers if lf.name == "model.layers.0.self_attn.q_proj")
    assert (q.r, q.lora_alpha, q.scaling, q.d_in, q.d_out) == (8, 16.0, 2.0, 64, 64)
    assert (q.a_shape, q.b_shape) == ((8, 64), (64, 8))
    assert len(facts.layers) == 4
    assert facts.adapters["default"].target_modules == ["q_proj", "v_proj"]
