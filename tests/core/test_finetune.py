"""The training engine: learning on a real task, the caller's model left alone, zeros kept
zero (unstructured and 2:4), distillation without labels, gradual pruning ending at the
one-shot plan's shapes, early stopping, checkpoints that resume where a cancelled run stopped,
pause/resume, and one-line errors for bad settings."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, PauseToken
from studio.core.models.data import DataSet, demo_splits
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.core.scan.masks import nm_view
from studio.core.train.finetune import (
    FinetuneJob,
    FinetuneSettings,
    GradualSchedule,
    history_csv,
    weight_sparsity,
)

# one thread: these small models run faster so, and far faster on shared cores
ONE = {"log_every_steps": 1, "threads": 1}
FAST = {"batch_size": 32, "warmup_epochs": 0.0, "log_every_steps": 1, "threads": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_net() -> LoadedModel:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return LoadedModel(module.eval(), "tiny", "tiny", EAGER, (1, 1, 32, 32))


def tiny_net_other() -> LoadedModel:
    other = tiny_net()
    with torch.no_grad():
        other.module[0].weight.mul_(2)
    return other


@pytest.fixture(scope="module")
def digits() -> tuple[DataSet, DataSet]:
    train, val = demo_splits()
    return train.subset(192), val.subset(96)


def state(model: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(digits) -> tuple[LoadedModel, dict, FinetuneJob, list]:
    """The tiny net trained for 3 epochs: (student, its state before, job, records)."""
    train, val = digits
    student = tiny_net()
    before = state(student)
    job = FinetuneJob(student, train, val, FinetuneSettings(epochs=3, lr=0.1, **FAST))
    return student, before, job, list(job.run())


def test_learns_a_real_task_and_leaves_the_callers_model_alone(digits, trained) -> None:
    _, val = digits
    student, before, job, records = trained
    steps = [r for r in records if r.kind == "step"]
    epochs = [r for r in records if r.kind == "epoch"]
    assert len(epochs) == 3 and len(steps) == 3 * 6
    assert steps[-1].loss < 0.8 * steps[0].loss
    assert [r.step for r in steps] == list(range(1, 19))
    assert steps[5].epoch == 1.0 and steps[2].epoch == 0.5
    result = job.result
    assert result is not None and result.epochs_run == 3
    assert result.accuracy_after > result.accuracy_before + 0.2
    best = [r for r in epochs if r.is_best][-1]
    assert result.best_epoch == best.epoch and result.accuracy_after == best.val_accuracy
    assert all(r.lr > 0 and r.samples_per_s > 0 for r in steps)
    # the caller's module: same weights, same buffers, still in eval mode
    assert all(torch.equal(before[k], v) for k, v in student.module.state_dict().items())
    assert not student.module.training
    # the result is the best epoch's model, in eval mode, measured as reported
    from studio.core.models.evaluate import evaluate

    assert not result.model.module.training
    assert evaluate(result.model.module, val).accuracy == pytest.approx(result.accuracy_after)
    csv = history_csv(result.history).splitlines()
    assert csv[0].startswith("kind,step,epoch,loss,lr,sparsity") and len(csv) == 1 + 21
    assert set(result.to_dict()) >= {"epochs_run", "best_epoch", "accuracy_before", "seconds"}


@pytest.mark.parametrize("method", ["unstructured", "nm"])
def test_zeros_stay_zero(digits, method: str) -> None:
    train, val = digits
    student = tiny_net()
    names = prune_targets(student, method)
    ratio = 0.8 if method == "unstructured" else 0.5
    pruned = prune(student, PruningPlan(method, ratios={n: ratio for n in names})).model
    zeros = {n: p == 0 for n, p in pruned.module.named_parameters() if p.dim() >= 2}
    sparsity = weight_sparsity(pruned.module)
    job = FinetuneJob(pruned, train, val, FinetuneSettings(epochs=1, lr=0.1, **FAST))
    records = list(job.run())
    assert job.result is not None
    after = dict(job.result.model.module.named_parameters())
    for name, zero in zeros.items():
        assert bool((after[name][zero] == 0).all()), name
        assert bool((after[name][~zero] != 0).all()), name  # the rest did train
    assert job.result.sparsity == pytest.approx(sparsity)
    assert all(r.sparsity == pytest.approx(sparsity) for r in records)
    if method == "unstructured":
        assert sparsity > 0.75
    else:
        for name in names:
            view = nm_view(after[f"{name}.weight"])
            assert view is not None and bool(((view == 0).sum(-1) >= 2).all())


def test_distillation_without_labels_reports_agreement(digits, trained) -> None:
    train, val = digits
    teacher = trained[2].result.model
    unlabeled = DataSet(train.x, None, "unlabeled")
    val_unlabeled = DataSet(val.x, None, "unlabeled val")
    with pytest.raises(StudioError, match="no labels: give a teacher"):
        FinetuneJob(tiny_net(), unlabeled, val, FinetuneSettings(epochs=1))
    torch.manual_seed(1)
    student = LoadedModel(
        nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)).eval(), "s", "s", EAGER, (1, 1, 32, 32)
    )
    settings = FinetuneSettings(epochs=2, optimizer="adamw", lr=0.01, augment="none", **FAST)
    job = FinetuneJob(student, unlabeled, val_unlabeled, settings, teacher=teacher)
    records = list(job.run())
    result = job.result
    assert result is not None and result.accuracy_before is None and result.accuracy_after is None
    assert result.agreement_after > result.agreement_before
    assert all(r.val_accuracy is None and r.agreement is not None for r in records[-1:])


def test_early_stopping_when_nothing_improves(digits) -> None:
    train, val = digits
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)).eval()
    student = LoadedModel(module, "mlp", "mlp", EAGER, (1, 1, 32, 32))
    settings = FinetuneSettings(
        epochs=6, lr=1e-9, schedule="constant", early_stopping_patience=1, **FAST
    )
    job = FinetuneJob(student, train.subset(64), val, settings)
    list(job.run())
    assert job.result is not None
    assert job.result.stopped_early and job.result.epochs_run == 2 and job.result.best_epoch == 1


def test_cancelled_run_continues_from_its_checkpoint(digits, tmp_path) -> None:
    train, val = digits
    settings = FinetuneSettings(epochs=3, lr=0.1, **FAST)
    student = tiny_net()
    cancel = CancelToken()
    job = FinetuneJob(student, train, val, settings, checkpoint_dir=tmp_path / "ck")
    seen = []
    with pytest.raises(Cancelled):
        for record in job.run(cancel=cancel):
            seen.append(record)
            if record.kind == "step" and record.epoch == 1.5:  # mid-way through epoch 2
                cancel.cancel()
    assert (tmp_path / "ck" / "last.pt").is_file() and (tmp_path / "ck" / "best.pt").is_file()
    fresh = FinetuneJob(student, train, val, settings, checkpoint_dir=tmp_path / "ck")
    assert fresh.resumed_from == 1
    assert [r.epoch for r in fresh.history if r.kind == "epoch"] == [1.0]
    again = job  # the cancelled job run again continues from its checkpoint as well
    new = list(again.run())
    assert [r.epoch for r in new if r.kind == "epoch"] == [2.0, 3.0]
    assert min(r.epoch for r in new) > 1.0  # epoch 1 was not trained again
    result = again.result
    assert result is not None and result.epochs_run == 3 and result.resumed_from == 1
    assert [r.epoch for r in result.history if r.kind == "epoch"] == [1.0, 2.0, 3.0]
    # the same weights as a run that was never interrupted
    straight = FinetuneJob(student, train, val, settings)
    list(straight.run())
    assert straight.result is not None
    ours, theirs = result.model.module.state_dict(), straight.result.model.module.state_dict()
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-5) for k in ours)
    # a finished run made again does nothing more
    done = FinetuneJob(student, train, val, settings, checkpoint_dir=tmp_path / "ck")
    assert list(done.run()) == [] and done.result is not None and done.result.epochs_run == 3
    # another model or other settings are refused
    with pytest.raises(StudioError, match="another model"):
        FinetuneJob(tiny_net_other(), train, val, settings, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(StudioError, match="other settings"):
        FinetuneJob(
            student,
            train,
            val,
            FinetuneSettings(epochs=3, lr=0.01, **FAST),
            checkpoint_dir=tmp_path / "ck",
        )


def test_gradual_structured_pruning_ends_at_the_one_shot_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = (x.mean((1, 2, 3)) > 0).long()
    data = DataSet(x, y, "synthetic")
    student = load_model("zoo:resnet20", input_shape=(1, 1, 8, 8))
    names = prune_targets(student, "structured")
    plan = PruningPlan("structured", ratios={n: 0.5 for n in names})
    one_shot = prune(student, plan)
    settings = FinetuneSettings(epochs=2, batch_size=16, warmup_epochs=0.0, **ONE)
    job = FinetuneJob(student, data, data, settings, gradual=GradualSchedule(plan, steps=2))
    records = list(job.run())
    scales = [r.ratio_scale for r in records]
    assert scales == sorted(scales) and scales[0] < 1.0 and scales[-1] == pytest.approx(1.0)
    assert {r.ratio_scale for r in records if r.is_best} == {1.0}
    assert job.result is not None
    got = {n: tuple(p.shape) for n, p in job.result.model.module.named_parameters()}
    want = {n: tuple(p.shape) for n, p in one_shot.module.named_parameters()}
    assert got == want
    assert job.result.params == one_shot.params_after


def test_pause_blocks_until_resumed_and_cancel_ends_the_wait() -> None:
    pause = PauseToken()
    assert not pause.paused
    pause.wait()  # not paused: returns at once
    pause.pause()
    assert pause.paused
    threading.Timer(0.2, pause.resume).start()
    start = time.monotonic()
    pause.wait()
    assert time.monotonic() - start >= 0.15 and not pause.paused
    pause.pause()
    cancel = CancelToken()
    threading.Timer(0.1, cancel.cancel).start()
    with pytest.raises(Cancelled):
        pause.wait(cancel)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be 1 or more"),
        ("optimizer", "rmsprop", "unknown optimizer 'rmsprop'"),
        ("lr", -1.0, "learning rate"),
        ("schedule", "linear", "unknown schedule"),
        ("distill_weight", 1.5, "distillation weight"),
        ("distill_temperature", 0.0, "temperature"),
        ("warmup_epochs", 9.0, "warm-up"),
        ("early_stopping_patience", 0, "patience"),
        ("augment", "rotate", "unknown augmentation"),
    ],
)
def test_bad_settings_are_one_line_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(StudioError, match=message) as info:
        FinetuneSettings(**{field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bad_inputs_are_refused(digits) -> None:
    train, val = digits
    wrong = DataSet(torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), "rgb")
    with pytest.raises(StudioError, match="inputs of shape"):
        FinetuneJob(tiny_net(), wrong, val)
    if not torch.cuda.is_available():
        job = FinetuneJob(tiny_net(), train, val, FinetuneSettings(device="cuda"))
        with pytest.raises(StudioError, match="no CUDA"):
            list(job.run())
    with pytest.raises(StudioError, match="gradual pruning works with"):
        GradualSchedule(PruningPlan("blocks", ratios={"x": 1.0}), steps=2)


@pytest.mark.parametrize(
    ("arch", "method", "ratio"), [("vit", "structured", 0.25), ("lstm", "unstructured", 0.8)]
)
def test_vit_and_lstm_prune_and_fine_tune_end_to_end(arch: str, method: str, ratio: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 16, 16, generator=generator)
    data = DataSet(x, (x.mean((1, 2, 3)) > 0).long(), "synthetic")
    model = load_model(f"zoo:{arch}", input_shape=(1, 1, 16, 16))
    names = prune_targets(model, method)
    pruned = prune(model, PruningPlan(method, ratios={n: ratio for n in names[:3]}))
    assert pruned.params_after < pruned.params_before or pruned.sparsity > 0.0
    settings = FinetuneSettings(epochs=1, batch_size=16, optimizer="adamw", **ONE)
    job = FinetuneJob(pruned.model, data, data, settings, teacher=model)
    records = list(job.run())
    assert job.result is not None and job.result.epochs_run == 1
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in records)
    assert job.result.params == pruned.params_after
    assert job.result.sparsity == pytest.approx(pruned.sparsity)


def test_gradual_run_resumes_with_the_pruned_shapes(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    data = DataSet(x, (x.mean((1, 2, 3)) > 0).long(), "synthetic")
    student = load_model("zoo:resnet20", input_shape=(1, 1, 8, 8))
    names = prune_targets(student, "structured")
    plan = PruningPlan("structured", ratios={n: 0.5 for n in names[:4]})
    settings = FinetuneSettings(epochs=3, batch_size=16, warmup_epochs=0.0, **ONE)
    schedule = GradualSchedule(plan, steps=2)  # both steps in the first epoch
    cancel = CancelToken()
    job = FinetuneJob(student, data, data, settings, checkpoint_dir=tmp_path, gradual=schedule)
    with pytest.raises(Cancelled):
        for record in job.run(cancel=cancel):
            if record.kind == "epoch":
                cancel.cancel()
    again = FinetuneJob(student, data, data, settings, checkpoint_dir=tmp_path, gradual=schedule)
    assert again.resumed_from == 1
    records = list(again.run())
    assert {r.ratio_scale for r in records} == {1.0}  # no step was pruned again
    assert again.result is not None and again.result.epochs_run == 3
    got = {n: tuple(p.shape) for n, p in again.result.model.module.named_parameters()}
    want = {n: tuple(p.shape) for n, p in prune(student, plan).module.named_parameters()}
    assert got == want
    # the student given to both jobs is untouched
    assert student.module.layers[0].conv1.out_channels == 16


def test_labels_and_teachers_that_do_not_fit_are_refused(digits) -> None:
    train, val = digits
    three = DataSet(train.x, train.y % 3, "three classes")
    torch.manual_seed(0)
    small = nn.Sequential(nn.Flatten(), nn.Linear(1024, 3)).eval()
    student = LoadedModel(small, "three", "three", EAGER, (1, 1, 32, 32))
    job = FinetuneJob(student, train, DataSet(val.x, val.y % 3, "v"), FinetuneSettings(**ONE))
    with pytest.raises(StudioError, match="has 3 outputs but digits"):
        list(job.run())
    job = FinetuneJob(student, three, three, FinetuneSettings(**ONE), teacher=tiny_net())
    with pytest.raises(StudioError, match="teacher's outputs"):
        list(job.run())
