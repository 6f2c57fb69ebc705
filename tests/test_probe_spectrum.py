"""The spectrum probe on a real Trainer, token counting, and the planted-rank benchmark's small form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import DoctorConfig, LoraDoctorCallback
from lora_doctor.probes.spectrum import count_supervised_tokens, lora_layers

VOCAB = 64


def _peft(r: int = 4, **lora: object):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], **lora)
    return get_peft_model(LlamaForCausalLM(cfg), config)


class _Rows(torch.utils.data.Dataset):
    """Rows whose first 3 labels are masked: 5 supervised tokens per row of 8."""

    def __init__(self, n: int = 12, seq: int = 8) -> None:
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:3] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _train(tmp_path: Path, model, config: DoctorConfig, steps: int = 6) -> tuple:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = LoraDoctorCallback(config=config)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[callback])
    trainer.train()
    return callback, trainer


@pytest.mark.slow
def test_probe_reads_spectra_on_a_real_trainer(tmp_path: Path) -> None:
    model = _peft()
    config = DoctorConfig(spectrum_every_steps=3, time_budget=None)  # every planned reading
    callback, trainer = _train(tmp_path, model, config)
    facts = callback.doctor.facts
    assert [s.step for s in facts.spectrum] == [3, 6]
    assert facts.supervised_tokens == 12 * 5 and facts.supervised_tokens_sampled is False
    last = facts.spectrum[-1]
    assert {lay.kind for lay in last.layers} == {"q_proj", "v_proj"}
    for layer in lora_layers(model):
        got = next(lay for lay in last.layers if lay.name == layer.name)
        dense = torch.linalg.svdvals(layer.scaling * layer.b.detach() @ layer.a.detach())
        torch.testing.assert_close(
            torch.tensor(got.singular_values), dense[:4], rtol=1e-4, atol=1e-6
        )
        base = layer.base.weight.detach().norm()
        assert got.relative_update == pytest.approx(float(dense.norm() / base), rel=1e-4)
    assert set(last.kinds) == {"q_proj", "v_proj"} and last.kinds["q_proj"]["r"] == 4
    # the per-kind metrics went into the logs (for the trackers), not into log_history
    assert callback.doctor.history.series("lora_doctor/effective_rank/q_proj").steps.tolist() == [
        3,
        6,
    ]
    assert not [k for e in trainer.state.log_history for k in e if k.startswith("lora_doctor/")]
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    assert [s["step"] for s in report["run"]["spectrum"]] == [3, 6]


@pytest.mark.slow
def test_probe_switched_off_and_nonzero_init_marked(tmp_path: Path) -> None:
    callback, _ = _train(tmp_path / "off", _peft(), DoctorConfig(spectrum=False), steps=2)
    assert callback.doctor.facts.spectrum == []
    model = _peft()
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.b.normal_()
    callback, _ = _train(tmp_path / "init", model, DoctorConfig(time_budget=None), steps=2)
    assert all(lay.init_nonzero for lay in callback.doctor.facts.spectrum[-1].layers)


class _NoLen(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"input_ids": [1, 2]}


@pytest.mark.parametrize(
    ("dataset", "sample", "want"),
    [
        ([{"labels": [-100, -100, 3, 4]}, {"labels": torch.tensor([5, -100])}], 10, (3, False)),
        ([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}], 10, (2, False)),
        ([{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}], 10, (2, False)),
        ([{"input_ids": [1, 2, 3]}], 10, (3, False)),
        ([{"labels": [1, 2]}] * 50, 10, (100, True)),
        (_NoLen(), 10, None),
        ([], 10, None),
        ([{"text": "no tokens"}], 10, None),
    ],
    ids=[
        "labels",
        "attention-mask",
        "completion-mask",
        "input-ids",
        "sampled",
        "iterable",
        "empty",
        "untokenized",
    ],
)
def test_count_supervised_tokens(dataset, sample: int, want) -> None:
    assert count_supervised_tokens(dataset, sample) == want


@pytest.mark.slow
def test_planted_rank_small_form(tmp_path: Path) -> None:
    """r < k is found binding, r well above k idle, and the memorisable set never called binding."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import planted_rank as bench

    s = bench.SMALL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        models = bench.build_models(s, "cpu")
        memo = bench.sample_from(models[2], s, "cpu")
        runs = {
            (mode, r): bench.train_one(s, mode, r, "cpu", tmp_path, models, memo)
            for mode, r in (("fresh", s.k // 2), ("fresh", 4 * s.k), ("memorise", s.k // 2))
        }
    finally:
        torch.set_num_threads(threads)
    assert runs["fresh", s.k // 2]["verdict"] == "saturated"
    assert runs["fresh", 4 * s.k]["verdict"] == "underused"
    assert runs["memorise", s.k // 2]["verdict"] in {"inconclusive", "-"}
    assert runs["fresh", s.k // 2]["final_loss"] > runs["fresh", 4 * s.k]["final_loss"]


def _drive(model, steps: tuple[int, ...] = (1,)):
    """Runs the spectrum probe by hand: train_begin, then a snapshot at each step."""
    from types import SimpleNamespace

    from lora_doctor.engine import Doctor
    from lora_doctor.probes.base import Event
    from lora_doctor.probes.spectrum import SpectrumProbe

    doctor = Doctor(DoctorConfig(), emit=False)
    probe = SpectrumProbe(doctor.config)

    def event(step: int) -> Event:
        state = SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=True)
        return Event(doctor=doctor, args=None, state=state, model=model)

    probe.train_begin(event(0))
    for step in steps:
        probe.snapshot(event(step))
    return doctor.facts


def _moved_peft():
    model = _peft()
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.b.normal_()
    return model


def test_fake_zero3_partitions_are_gathered_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ZeRO-3 a parameter holds nothing outside deepspeed.zero.GatheredParameters."""
    import contextlib
    import types

    model = _moved_peft()
    want = _drive(model).spectrum[-1].layers
    stash = {}
    for i, p in enumerate(model.parameters()):
        stash[id(p)] = p.data
        p.data = torch.empty(0, dtype=p.dtype)
        p.ds_id, p.ds_shape, p.ds_numel = i, stash[id(p)].shape, stash[id(p)].numel()
    calls = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=0):
        calls.append((len(params), modifier_rank))
        for p in params:
            p.data = stash[id(p)]
        yield
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    got = _drive(model).spectrum[-1].layers
    assert [lay.singular_values for lay in got] == [lay.singular_values for lay in want]
    assert [lay.relative_update for lay in got] == [lay.relative_update for lay in want]
    # per layer: base weight and B at train_begin, then A and B together; all read-only
    assert calls == [(1, None), (1, None)] * 2 + [(2, None)] * 2


class Params4bit(torch.nn.Parameter):
    """Named like bitsandbytes' 4-bit parameter."""


@pytest.mark.parametrize("dequantizes", [True, False], ids=["dequantized", "unreadable"])
def test_4bit_base_is_dequantized_once_or_noted(
    monkeypatch: pytest.MonkeyPatch, dequantizes: bool
) -> None:
    import peft.utils.integrations as integrations

    model = _moved_peft()
    want = _drive(model).spectrum[-1].layers[0]
    base = lora_layers(model)[0].base
    original = base.weight.detach().clone()
    base.weight = Params4bit(
        torch.zeros(original.numel() // 2, 1, dtype=torch.uint8), requires_grad=False
    )

    def dequantize(module):
        if not dequantizes:
            raise ImportError("bitsandbytes")
        return original

    monkeypatch.setattr(integrations, "dequantize_module_weight", dequantize)
    facts = _drive(model)
    got = facts.spectrum[-1].layers[0]
    assert got.singular_values == want.singular_values
    if dequantizes:
        assert got.relative_update == pytest.approx(want.relative_update)
        assert facts.spectrum_notes == []
    else:
        assert got.relative_update is None
        assert "quantized base weight not read" in facts.spectrum_notes[0]


def test_old_snapshots_keep_only_their_summary() -> None:
    facts = _drive(_moved_peft(), steps=(1, 2, 3))
    assert [bool(s.layers) for s in facts.spectrum] == [False, False, True]
    assert all(s.kinds for s in facts.spectrum)
    assert [all("spectrum" in k for k in s.kinds.values()) for s in facts.spectrum] == [
        False,
        False,
        True,
    ]
    assert all("used_rank" in k for s in facts.spectrum for k in s.kinds.values())
