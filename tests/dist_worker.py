"""Two-process CPU (gloo) checks of the doctor, run by tests/test_multiprocess.py under torchrun.

``torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR`` does, on every rank:

1. a tiny LoRA run with ``LoraDoctorCallback`` under DDP (the Trainer sets up the gloo group);
2. ``gather_min_max`` with readings that differ between ranks (a key only rank 1 has);
3. an FSDP2 ``fully_shard`` of a tiny PEFT model on the same group: the adapter facts read from
   DTensors, the first-steps gradient and movement readings, and the update's spectrum (DTensors
   gathered with ``full_tensor`` on both ranks).

Each rank writes ``DIR/rank<N>.json``; rank 0's callback writes ``DIR/run/lora_doctor.json``.

Every rank destroys the process group before it exits. Without that, Gloo's worker threads may still
hold the last collectives' work objects (tensors with Python references) while the interpreter shuts
down; releasing them then takes the GIL of a finalizing interpreter, and the process dies of SIGABRT
("terminate called without an active exception") after its work is done: a failure that depends on
timing, seen in a loaded full-suite run (pytorch/pytorch#190489; PyTorch's own tests destroy the
group for the same reason, pytorch/pytorch#65513).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer

from lora_doctor import LoraDoctorCallback
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.probes.base import Event
from lora_doctor.probes.dist import gather_min_max
from lora_doctor.probes.model import AdapterProbe
from lora_doctor.probes.spectrum import SpectrumProbe


def ddp_run(out: Path) -> dict[str, Any]:
    doctor = LoraDoctorCallback()
    # lora_alpha 32 at r 4 (scaling 8): a warning every rank finds, only rank 0 may log.
    args = tiny_args(out / "run", ddp_backend="gloo", max_steps=3)
    trainer = Trainer(model=tiny_peft(4, 32), args=args, train_dataset=Rows(32), callbacks=[doctor])
    trainer.train()
    assert doctor.doctor is not None
    return {
        "findings": [f.slug for f in doctor.doctor.findings],
        "logged": doctor.doctor.history.entries,  # the entries with the doctor's metrics
    }


def fsdp2_readings(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_peft(4, 8)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    doctor = Doctor(DoctorConfig(check_after_steps=1), emit=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probe = AdapterProbe()
    spectrum = SpectrumProbe(doctor.config)

    def event(step: int) -> Event:
        state = SimpleNamespace(global_step=step, is_world_process_zero=rank == 0)
        return Event(doctor=doctor, args=None, state=state, model=model, optimizer=optimizer)

    probe.train_begin(event(0))
    spectrum.train_begin(event(0))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    probe.pre_optimizer_step(event(0))
    optimizer.step()
    probe.step_end(event(1))
    spectrum.snapshot(event(1))  # gathers DTensors: a collective call on both ranks
    facts = doctor.facts
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = q_proj.lora_A["default"].weight
    full_a, full_b = weight.full_tensor(), q_proj.lora_B["default"].weight.full_tensor()
    dense = torch.linalg.svdvals(q_proj.scaling["default"] * full_b.detach() @ full_a.detach())
    q_layer = next(
        lay for lay in facts.spectrum[-1].layers if lay.name == "model.layers.0.self_attn.q_proj"
    )
    return {
        "param_type": type(weight).__name__,
        "local_shape": list(weight.to_local().shape),
        "layers": {lf.name: [lf.a_shape, lf.b_shape] for lf in facts.layers},
        "lora_params": facts.lora_params,
        "no_grad_layers": facts.no_grad_layers,
        "b_still_zero_layers": facts.b_still_zero_layers,
        "frozen_in_place": facts.frozen_in_place,
        "spectrum_q": q_layer.singular_values,
        "spectrum_q_dense": dense[:4].tolist(),
        "spectrum_q_relative_update": q_layer.relative_update,
        "spectrum_layers": len(facts.spectrum[-1].layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    faulthandler.enable()  # a crash prints every thread's Python stack into the test's output
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    try:
        record: dict[str, Any] = {"rank": rank, "ddp": ddp_run(out)}
        readings: dict[str, float] = {"step_seconds": 1.0 + rank, "peak_bytes": 100.0 * (rank + 1)}
        if rank == 1:
            readings["only_rank1"] = 7.0
        record["gather"] = {k: vars(v) for k, v in gather_min_max(readings).items()}
        record["fsdp2"] = fsdp2_readings(rank, world)
        (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # joins Gloo's threads while Python is alive


if __name__ == "__main__":
    main()
