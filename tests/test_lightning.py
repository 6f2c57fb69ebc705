"""LoraDoctor: the Lightning callback, on a tiny LoRA Llama in a LightningModule, on CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

if importlib.util.find_spec("lightning") is None:  # installed but broken fails loudly below
    pytest.skip("the lightning extra is not installed", allow_module_level=True)
import lightning as L
from tiny import Rows, tiny_peft

from lora_doctor import DoctorConfig
from lora_doctor.lightning import LoraDoctor

#: The tiny model's own findings (its adapter is a large share of a tiny base; q/v targets).
QUIET = {"lora-param-budget", "attention-only-targets"}


class LitLoRA(L.LightningModule):
    """A peft model in a LightningModule; ``only`` filters the optimizer's parameters by name."""

    def __init__(
        self,
        only: str | None = None,
        die_at: int | None = None,
        name: str = "train_loss",
        lora_alpha: float = 8,
    ):
        super().__init__()
        self.model = tiny_peft(4, lora_alpha, seed=1)
        self.only, self.die_at, self.name = only, die_at, name
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.die_at is not None and self.global_step == self.die_at:
            raise IndexError("index out of range in self")
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        self.log(self.name, loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and (self.only is None or self.only in n)
        ]
        return torch.optim.AdamW(params, lr=1e-3)


def _fit(
    tmp_path: Path,
    module: LitLoRA,
    callbacks: list[Any],
    max_steps: int = 4,
    ckpt_path: str | None = None,
    **trainer_args: Any,
) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=2,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **trainer_args,
    )
    loader = torch.utils.data.DataLoader(Rows(n=32), batch_size=2)
    trainer.fit(
        module, loader, torch.utils.data.DataLoader(Rows(n=4), batch_size=2), ckpt_path=ckpt_path
    )
    return trainer


def _report(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "lora_doctor.json").read_text())


@pytest.mark.parametrize(
    ("module", "fires", "quiet"),
    [
        ({}, set(), {"adapter-not-learning", "adapter-not-in-optimizer", "alpha-rank-ratio"}),
        ({"only": "lora_A"}, {"adapter-not-in-optimizer", "adapter-not-learning"}, set()),
        ({"lora_alpha": 32}, {"alpha-rank-ratio"}, {"adapter-not-learning"}),
    ],
    ids=["healthy", "lora-B-not-in-optimizer", "alpha-8x-rank"],
)
def test_lightning_finds_the_mistake_and_writes_the_json(
    tmp_path: Path, module: dict[str, Any], fires: set[str], quiet: set[str]
) -> None:
    """The peft model sits inside the LightningModule: its configuration is read from there."""
    _fit(tmp_path, LitLoRA(**module), [LoraDoctor(ignore=QUIET)])
    report = _report(tmp_path)
    slugs = {f["slug"] for f in report["findings"]}
    assert fires <= slugs
    assert not quiet & slugs
    assert report["run"]["global_step"] == 4
    assert report["run"]["max_steps"] == 4


def test_lightning_run_is_the_same_with_and_without_the_doctor(tmp_path: Path) -> None:
    plain, doctored = LitLoRA(), LitLoRA()
    _fit(tmp_path / "a", plain, [])
    _fit(tmp_path / "b", doctored, [LoraDoctor()])
    assert plain.losses == doctored.losses
    for (name, p), (_, q) in zip(
        plain.named_parameters(), doctored.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("logged", "metrics"),
    [("train_loss", None), ("my_loss", {"my_loss": "loss"})],
    ids=["default-names", "user-names"],
)
def test_lightning_metrics_reach_the_curves(
    tmp_path: Path, logged: str, metrics: dict[str, str] | None
) -> None:
    callback = LoraDoctor(metrics=metrics, report_path=False)
    _fit(tmp_path, LitLoRA(name=logged), [callback])
    assert callback.loop is not None
    history = callback.loop.doctor.history
    assert history.series("loss").steps.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert history.series("learning_rate").values.tolist() == [1e-3] * 4
    assert history.series("eval_loss").steps.tolist() == [2.0, 4.0]
    assert not (tmp_path / "lora_doctor.json").exists()


def test_lightning_writes_the_json_when_training_dies(tmp_path: Path) -> None:
    with pytest.raises(IndexError, match="index out of range"):
        _fit(tmp_path, LitLoRA(die_at=3), [LoraDoctor()])
    died = [f for f in _report(tmp_path)["findings"] if f["slug"] == "training-died"]
    assert len(died) == 1
    assert died[0]["step"] == 4  # three steps done, it died in the fourth


def test_lightning_stop_on_stops_the_trainer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        trainer = _fit(
            tmp_path,
            LitLoRA(only="lora_A"),
            [LoraDoctor(config=DoctorConfig(stop_on={"adapter-not-learning"}))],
            max_steps=20,
        )
    assert trainer.global_step == 2  # the first-steps checks run after 2 steps
    assert any("stopping training at step 2" in r.message for r in caplog.records)


def test_lightning_resume_keeps_the_doctor_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = LoraDoctor(ignore=QUIET)
    trainer = _fit(tmp_path, LitLoRA(only="lora_A"), [first])
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = LoraDoctor(ignore=QUIET)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        _fit(tmp_path, LitLoRA(only="lora_A"), [resumed], max_steps=6, ckpt_path=str(checkpoint))
    assert resumed.loop is not None
    assert not [r for r in caplog.records if "adapter-not-learning" in r.message]  # not twice
    assert "adapter-not-learning" in {f.slug for f in resumed.loop.doctor.findings}
    assert resumed.loop.doctor.history.series("loss").steps.tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": {"loss": 3}}, "metrics"),
        ({"report_path": True}, "report_path"),
        ({"ignore": {"no-such-finding"}}, "no-such-finding"),
    ],
    ids=["metrics", "report-path", "unknown-slug"],
)
def test_lightning_wrong_options_get_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraDoctor(**kwargs)
