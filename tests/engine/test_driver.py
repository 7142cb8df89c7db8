"""Tests of the optimization driver: convergence, schedules, clipping, logs, checkpoints, resume, NaN guard."""

from __future__ import annotations

import csv
import json
import math
import pickle

import pytest
import torch

from diffworld.engine.driver import (
    NonFiniteError,
    OptimizerSettings,
    OptimizeResult,
    lr_factor,
    optimize,
    status,
)

TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic_problem(start=(4.0, 3.0, -1.0)):
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)

    def loss_fn(i: int):
        d = x - TARGET
        return (d * d).sum(), {"first": d[0] ** 2, "rest": float((d[1:] ** 2).sum().detach())}

    return x, loss_fn


def noisy_two_param_problem():
    """Deterministic given torch's RNG: the loss draws noise each call (tests RNG restore on resume)."""
    a = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.5, 2.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)

    def loss_fn(i: int):
        noise = torch.randn(3, dtype=torch.float64) * 0.01
        la = ((a - 1.0 + noise) ** 2).sum()
        lb = ((b @ b.T - torch.eye(2, dtype=torch.float64)) ** 2).sum()
        return la + 0.1 * lb, {"a_fit": la, "b_orth": lb}

    return {"a": a, "b": b}, loss_fn


# ------------------------------------------------------------------------------------------ basics


@pytest.mark.parametrize(
    "settings",
    [
        OptimizerSettings(name="adam", lr=0.1, iterations=400, checkpoint_every=0),
        OptimizerSettings(name="adamw", lr=0.1, iterations=400, checkpoint_every=0),
        OptimizerSettings(name="sgd", lr=0.1, momentum=0.5, iterations=150, checkpoint_every=0),
        OptimizerSettings(name="lbfgs", lr=1.0, iterations=5, checkpoint_every=0),
    ],
    ids=lambda s: s.name,
)
def test_optimizers_minimize_quadratic(settings):
    x, loss_fn = quadratic_problem()
    res = optimize({"x": x}, loss_fn, settings, progress=False)
    assert isinstance(res, OptimizeResult)
    assert torch.allclose(x.detach(), TARGET, atol=1e-4), x
    assert res.iterations_done == settings.iterations == len(res.history)
    assert res.best_loss <= res.history[0]["loss"]
    assert res.final_loss == res.history[-1]["loss"]
    assert res.out_dir is None and res.checkpoint is None and res.resumed_from is None


def test_lbfgs_calls_loss_several_times_and_logs_last_value():
    x, loss_fn = quadratic_problem()
    calls = []

    def counted(i):
        calls.append(i)
        return loss_fn(i)

    res = optimize({"x": x}, counted, OptimizerSettings(name="lbfgs", lr=1.0, iterations=2, checkpoint_every=0),
                   progress=False)
    assert len(calls) > 2
    assert set(calls) == {0, 1}
    # The logged loss is the last closure value of its iteration.
    assert len(res.history) == 2
    d = x.detach() - TARGET
    assert res.history[-1]["loss"] == pytest.approx(float((d * d).sum()), abs=1e-10)


def test_param_groups_have_their_own_lr():
    a = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    settings = OptimizerSettings(name="sgd", lr=0.1, iterations=1, checkpoint_every=0)
    optimize([{"params": {"a": a}}, {"params": {"b": b}, "lr": 0.01}], lambda i: -(a + b).sum(), settings,
             progress=False)
    assert a.item() == pytest.approx(0.1)
    assert b.item() == pytest.approx(0.01)


def test_projection_clamps_after_each_step():
    x = torch.tensor([0.0], requires_grad=True)
    seen = []

    def project():
        assert not torch.is_grad_enabled()
        x.clamp_(max=0.25)

    optimize({"x": x}, lambda i: ((x - 1.0) ** 2).sum(), OptimizerSettings(lr=0.1, iterations=20, checkpoint_every=0),
             progress=False, projection=project, callback=lambda i, row: seen.append(x.item()))
    assert max(seen) <= 0.25 and x.item() == pytest.approx(0.25)


def test_callback_can_stop_early(tmp_path):
    x, loss_fn = quadratic_problem()
    res = optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=100), tmp_path, progress=False,
                   callback=lambda i, row: i == 4)
    assert res.iterations_done == 5 and len(res.history) == 5
    ckpt = torch.load(tmp_path / "checkpoints" / "main.pt", weights_only=True)
    assert ckpt["done"] and ckpt["iteration"] == 5


def test_seed_determinism_and_caller_rng_untouched():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        params, loss_fn = noisy_two_param_problem()
        optimize(params, loss_fn, OptimizerSettings(lr=0.05, iterations=5, checkpoint_every=0, seed=7),
                 progress=False)
        assert torch.equal(torch.get_rng_state(), before)
        runs.append({k: v.detach().clone() for k, v in params.items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# ---------------------------------------------------------------------------------------- schedules


def _lrs(settings):
    x = torch.zeros(1, requires_grad=True)
    res = optimize({"x": x}, lambda i: (x ** 2).sum() + x.sum(), settings, progress=False)
    return [row["lr"] for row in res.history]


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", lambda i, n: 0.2),
        ("cosine", lambda i, n: 0.2 * 0.5 * (1 + math.cos(math.pi * i / n))),
        ("exponential", lambda i, n: 0.2 * 0.01 ** (i / n)),
        ("step", lambda i, n: 0.2 * 0.01 ** (i // 3)),
    ],
)
def test_schedules_follow_documented_formula(schedule, expected):
    n = 10
    settings = OptimizerSettings(name="sgd", lr=0.2, iterations=n, schedule=schedule, schedule_gamma=0.01,
                                 schedule_step=3, checkpoint_every=0)
    lrs = _lrs(settings)
    assert lrs == pytest.approx([expected(i, n) for i in range(n)], rel=1e-12)
    assert lrs == pytest.approx([0.2 * lr_factor(settings, i) for i in range(n)], rel=1e-12)
    if schedule != "constant":
        assert lrs[-1] < lrs[0]


def test_exponential_schedule_reaches_gamma_at_end_of_run():
    s = OptimizerSettings(iterations=50, schedule="exponential", schedule_gamma=0.1)
    assert lr_factor(s, 0) == 1.0
    assert lr_factor(s, 50) == pytest.approx(0.1)


def test_schedule_scales_each_group():
    a = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    settings = OptimizerSettings(name="sgd", lr=1.0, iterations=4, schedule="step", schedule_gamma=0.5,
                                 schedule_step=1, checkpoint_every=0)
    optimize([{"params": {"a": a}}, {"params": {"b": b}, "lr": 0.1}], lambda i: -(a + b).sum(), settings,
             progress=False)
    assert a.item() == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert b.item() == pytest.approx(0.1 * (1 + 0.5 + 0.25 + 0.125))


# ------------------------------------------------------------------------------------------ clipping


def test_clip_grad_norm_caps_the_step_and_logs_unclipped_norm():
    x = torch.tensor([30.0, 40.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    res = optimize({"x": x}, lambda i: 0.5 * (x ** 2).sum(),
                   OptimizerSettings(name="sgd", lr=1.0, iterations=1, clip_grad_norm=0.5, checkpoint_every=0),
                   progress=False)
    step = x.detach() - start
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-6)
    assert torch.allclose(step / step.norm(), -start / start.norm())  # direction kept
    assert res.history[0]["grad_norm"] == pytest.approx(50.0)


def test_clip_grad_value_caps_each_component():
    x = torch.tensor([30.0, -0.05, 4.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    res = optimize({"x": x}, lambda i: 0.5 * (x ** 2).sum(),
                   OptimizerSettings(name="sgd", lr=1.0, iterations=1, clip_grad_value=0.1, checkpoint_every=0),
                   progress=False)
    step = x.detach() - start
    assert step.tolist() == pytest.approx([-0.1, 0.05, -0.1])
    assert res.history[0]["grad_norm"] == pytest.approx(float(start.norm()))


# ------------------------------------------------------------------------------------- logs and plot


def test_outputs_log_plot_and_checkpoints(tmp_path):
    x, loss_fn = quadratic_problem()
    res = optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=12, checkpoint_every=5), tmp_path,
                   progress=False)
    assert res.out_dir == tmp_path
    assert res.checkpoint == tmp_path / "checkpoints" / "main.pt"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no temporary files left
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(12))
    assert set(rows[0]) == {"stage", "iteration", "loss", "lr", "grad_norm", "time_s", "first", "rest"}
    assert all(r["stage"] == "main" for r in rows)
    for row, hist in zip(rows, res.history):
        assert float(row["loss"]) == hist["loss"] and float(row["first"]) == hist["first"]
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["done"] is True and ckpt["iteration"] == 12 and len(ckpt["history"]) == 12
    assert torch.equal(ckpt["params"]["x"], x.detach())
    assert {"optimizer", "scheduler", "rng_state", "settings"} <= set(ckpt)


def test_checkpoint_written_every_n_iterations(tmp_path):
    x, loss_fn = quadratic_problem()
    seen = []

    def cb(i, row):
        path = tmp_path / "checkpoints" / "main.pt"
        seen.append(torch.load(path, weights_only=True)["iteration"] if path.exists() else None)

    optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=9, checkpoint_every=4), tmp_path,
             progress=False, callback=cb)
    assert seen == [None, None, None, 4, 4, 4, 4, 8, 8]


def test_multi_stage_csv_widens_header_and_jsonl(tmp_path):
    x = torch.tensor([2.0], requires_grad=True)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / fmt
        s = OptimizerSettings(lr=0.1, iterations=3, log_format=fmt, checkpoint_every=0)
        optimize({"x": x}, lambda i: ((x ** 2).sum(), {"fit": (x ** 2).sum()}), s, out, stage="coarse",
                 progress=False)
        optimize({"x": x}, lambda i: ((x ** 2).sum(), {"fit": x.sum() ** 2, "smooth": 0.5}), s, out,
                 stage="fine", progress=False)
        if fmt == "csv":
            with open(out / "log.csv", newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                assert reader.fieldnames == ["stage", "iteration", "loss", "lr", "grad_norm", "time_s", "fit",
                                             "smooth"]
            assert [r["smooth"] for r in rows] == ["", "", "", "0.5", "0.5", "0.5"]
        else:
            rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            assert "smooth" not in rows[0] and rows[-1]["smooth"] == 0.5
        assert [r["stage"] for r in rows] == ["coarse"] * 3 + ["fine"] * 3
        assert (out / "loss.png").exists()
        assert (out / "checkpoints" / "coarse.pt").exists() and (out / "checkpoints" / "fine.pt").exists()


def test_rerunning_a_stage_replaces_its_log_rows(tmp_path):
    x = torch.tensor([2.0], requires_grad=True)
    s = OptimizerSettings(lr=0.1, iterations=4, checkpoint_every=0, log_format="jsonl")
    optimize({"x": x}, lambda i: (x ** 2).sum(), s, tmp_path, stage="a", progress=False)
    optimize({"x": x}, lambda i: (x ** 2).sum(), s, tmp_path, stage="b", progress=False)
    optimize({"x": x}, lambda i: (x ** 2).sum(), s, tmp_path, stage="a", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["iteration"]) for r in rows] == [("b", i) for i in range(4)] + [("a", i) for i in range(4)]


def test_progress_lines_when_not_a_tty(capsys):
    x, loss_fn = quadratic_problem()
    optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=100, checkpoint_every=0), progress=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 11
    assert err[-1].startswith("[main] iteration 100/100") and "it/s" in err[-1] and "ETA" in err[-1]


def test_status_lines_when_not_a_tty(capsys):
    # Metrics and renders run without iterations: a line says what runs, another when it is done.
    with status("computing metrics"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "computing metrics..." and err[1].startswith("computing metrics: done in ")
    with status("computing metrics", enabled=False):
        pass
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- resume


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["adam", "sgd", "lbfgs"])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, name):
    settings = OptimizerSettings(name=name, lr=0.05 if name != "lbfgs" else 0.5, momentum=0.9 if name == "sgd" else 0.0,
                                 iterations=20, checkpoint_every=10, schedule="cosine", seed=3, lbfgs_max_iter=2)

    ref_params, ref_loss = noisy_two_param_problem()
    ref = optimize(ref_params, ref_loss, settings, tmp_path / "ref", progress=False)

    params, loss_fn = noisy_two_param_problem()

    def interrupt(i, row):
        if i == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(params, loss_fn, settings, tmp_path / "run", progress=False, callback=interrupt)
    assert (tmp_path / "run" / "loss.png").exists()  # plot written when stopped by an error

    params2, loss_fn2 = noisy_two_param_problem()  # fresh tensors, as in a new process
    res = optimize(params2, loss_fn2, settings, tmp_path / "run", resume=True, progress=False)
    assert res.resumed_from == 10 and res.iterations_done == 20
    for k in params2:
        assert torch.equal(params2[k].detach(), ref_params[k].detach()), k
    ref_ckpt = torch.load(tmp_path / "ref" / "checkpoints" / "main.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "main.pt", weights_only=True)
    assert _state_equal(ckpt["optimizer"], ref_ckpt["optimizer"])
    assert torch.equal(ckpt["rng_state"], ref_ckpt["rng_state"])
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in ref.history]
    # The log holds each iteration once: rows 10..13 of the interrupted run were replaced.
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == list(range(20))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    x, loss_fn = quadratic_problem()
    res = optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=3), tmp_path, resume=True,
                   progress=False)
    assert res.resumed_from is None and res.iterations_done == 3


def test_done_stage_resume_returns_immediately_and_restores_params(tmp_path):
    x, loss_fn = quadratic_problem()
    settings = OptimizerSettings(lr=0.1, iterations=15, checkpoint_every=5)
    first = optimize({"x": x}, loss_fn, settings, tmp_path, progress=False)
    final = x.detach().clone()

    y = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    calls = []
    res = optimize({"x": y}, lambda i: calls.append(i) or (y ** 2).sum(), settings, tmp_path, resume=True,
                   progress=False)
    assert calls == []
    assert res.iterations_done == 15 and res.resumed_from == 15
    assert res.history == first.history and res.final_loss == first.final_loss
    assert torch.equal(y.detach(), final)  # the next stage starts from this stage's result


def test_resume_rejects_mismatched_checkpoint(tmp_path):
    x, loss_fn = quadratic_problem()

    def stop(i, row):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=10, checkpoint_every=2), tmp_path,
                 progress=False, callback=stop)
    z = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        optimize({"x": z}, lambda i: (z ** 2).sum(), OptimizerSettings(), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="parameters"):
        optimize({"w": z}, lambda i: (z ** 2).sum(), OptimizerSettings(), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="settings.name"):
        optimize({"x": x}, loss_fn, OptimizerSettings(name="sgd"), tmp_path, resume=True, progress=False)


# ---------------------------------------------------------------------------------------- NaN guard


def test_nan_loss_term_stops_and_keeps_last_good_checkpoint(tmp_path):
    x = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
    snapshots = {}

    def loss_fn(i):
        fit = (x ** 2).sum()
        chamfer = fit * (float("nan") if i == 12 else 1.0)
        return fit + chamfer, {"fit": fit, "chamfer": chamfer}

    def remember(i, row):
        snapshots[i + 1] = x.detach().clone()

    ckpt_path = tmp_path / "checkpoints" / "recon.pt"
    with pytest.raises(NonFiniteError) as info:
        optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.05, iterations=30, checkpoint_every=5), tmp_path,
                 stage="recon", progress=False, callback=remember)
    err = info.value
    msg = str(err)
    assert "loss term 'chamfer'" in msg and "iteration 12" in msg and "'recon'" in msg and str(ckpt_path) in msg
    assert (err.stage, err.iteration, err.quantity, err.checkpoint, err.checkpoint_iteration) == \
        ("recon", 12, "loss term 'chamfer'", ckpt_path, 10)
    assert torch.equal(x.detach(), snapshots[12])  # the optimizer did not step with the bad values
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["iteration"] == 10 and not ckpt["done"]
    assert torch.isfinite(ckpt["params"]["x"]).all()
    assert torch.equal(ckpt["params"]["x"], snapshots[10])
    assert (tmp_path / "loss.png").exists()
    with open(tmp_path / "log.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == list(range(12))
    assert pickle.loads(pickle.dumps(err)).quantity == err.quantity


def test_nan_total_loss_without_checkpoint():
    x = torch.tensor([1.0], requires_grad=True)
    with pytest.raises(NonFiniteError, match=r"total loss at stage 'main', iteration 0.*no checkpoint"):
        optimize({"x": x}, lambda i: (x * float("inf")).sum(), OptimizerSettings(iterations=3), progress=False)


def test_nan_gradient_names_the_parameter(tmp_path):
    good = torch.tensor([1.0, 2.0], requires_grad=True)
    sdf = torch.tensor([0.0, 1.0], requires_grad=True)  # sqrt(sdf^2) has a NaN gradient at 0
    before = sdf.detach().clone()
    with pytest.raises(NonFiniteError, match="gradient of parameter 'sdf'") as info:
        optimize({"good": good, "sdf": sdf}, lambda i: (good ** 2).sum() + torch.sqrt(sdf ** 2).sum(),
                 OptimizerSettings(iterations=5), tmp_path, progress=False)
    assert info.value.iteration == 0
    assert torch.equal(sdf.detach(), before)
    assert (tmp_path / "loss.png").exists()


def test_nan_gradient_lbfgs_restores_params():
    x = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    calls = []

    def loss_fn(i):
        calls.append(i)
        loss = (x ** 2).sum()
        if len(calls) == 3:  # value 0, gradient NaN, inside LBFGS's inner iterations
            loss = loss + torch.sqrt((x[0] - x[0].detach()) ** 2)
        return loss

    with pytest.raises(NonFiniteError, match="parameter 'x'"):
        optimize({"x": x}, loss_fn, OptimizerSettings(name="lbfgs", lr=0.1, iterations=1, lbfgs_max_iter=10,
                                                      lbfgs_line_search="none"), progress=False)
    assert len(calls) == 3
    assert torch.equal(x.detach(), before)


def test_nonfinite_parameter_value_after_projection():
    x = torch.tensor([1.0, 2.0], requires_grad=True)

    def project():
        x[1] = float("inf")

    with pytest.raises(NonFiniteError, match="value of parameter 'x'.*iteration 0.*projection"):
        optimize({"x": x}, lambda i: (x ** 2).sum(), OptimizerSettings(iterations=3), progress=False,
                 projection=project)


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"name": "rmsprop"}, "name"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"iterations": -1}, "iterations"),
        ({"momentum": -0.1}, "momentum"),
        ({"betas": (0.9, 1.0)}, "betas[1]"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"schedule_gamma": 0.0}, "schedule_gamma"),
        ({"schedule_step": 0}, "schedule_step"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"clip_grad_value": -1.0}, "clip_grad_value"),
        ({"checkpoint_every": -5}, "checkpoint_every"),
        ({"log_format": "parquet"}, "log_format"),
        ({"name": "lbfgs", "weight_decay": 0.1}, "weight_decay"),
        ({"lbfgs_line_search": "armijo"}, "lbfgs_line_search"),
    ],
)
def test_bad_settings_raise_value_error_naming_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        OptimizerSettings(**kwargs)
    msg = str(info.value)
    assert f"OptimizerSettings.{field}:" in msg and "expected" in msg and "got" in msg


@pytest.mark.parametrize("kwargs,field", [({"iterations": 2.5}, "iterations"), ({"lr": "1e-3"}, "lr"),
                                          ({"seed": True}, "seed"), ({"name": None}, "name")])
def test_wrong_setting_types_raise_type_error(kwargs, field):
    with pytest.raises(TypeError, match=f"OptimizerSettings.{field}:"):
        OptimizerSettings(**kwargs)


def test_settings_mutated_after_construction_are_revalidated():
    s = OptimizerSettings()
    s.schedule = "bogus"
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="OptimizerSettings.schedule"):
        optimize({"x": x}, lambda i: (x ** 2).sum(), s, progress=False)


def test_bad_arguments():
    x = torch.zeros(2, requires_grad=True)
    s = OptimizerSettings(iterations=1)
    loss = lambda i: (x ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="parameter 'y'.*leaf"):
        optimize({"y": x * 2}, loss, s, progress=False)
    with pytest.raises(ValueError, match="parameter 'z'.*requires_grad"):
        optimize({"z": torch.zeros(2)}, loss, s, progress=False)
    with pytest.raises(TypeError, match="parameter 'i'.*floating"):
        optimize({"i": torch.zeros(2, dtype=torch.long)}, loss, s, progress=False)
    with pytest.raises(ValueError, match="same tensor"):
        optimize([{"params": {"a": x}}, {"params": {"b": x}}], loss, s, progress=False)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        optimize([{"params": {"a": x}, "momentum": 0.3}], loss, s, progress=False)
    with pytest.raises(ValueError, match="lbfgs"):
        optimize([{"params": {"a": x}}, {"params": {"b": torch.zeros(1, requires_grad=True)}}], loss,
                 OptimizerSettings(name="lbfgs", iterations=1), progress=False)
    with pytest.raises(ValueError, match="stage"):
        optimize({"x": x}, loss, s, stage="../evil", progress=False)
    with pytest.raises(ValueError, match="resume"):
        optimize({"x": x}, loss, s, resume=True, progress=False)
    with pytest.raises(TypeError, match="settings"):
        optimize({"x": x}, loss, {"lr": 0.1}, progress=False)
    with pytest.raises(ValueError, match="scalar loss"):
        optimize({"x": x}, lambda i: x ** 2, s, progress=False)
    with pytest.raises(ValueError, match="requires_grad"):
        optimize({"x": x}, lambda i: torch.tensor(1.0), s, progress=False)
    with pytest.raises(TypeError, match="loss term 'c'"):
        optimize({"x": x}, lambda i: ((x ** 2).sum(), {"c": "high"}), s, progress=False)
    with pytest.raises(ValueError, match="'lr'"):
        optimize({"x": x}, lambda i: ((x ** 2).sum(), {"lr": 1.0}), s, progress=False)


def test_zero_iterations_is_well_formed(tmp_path):
    x = torch.ones(2, requires_grad=True)
    res = optimize({"x": x}, lambda i: (x ** 2).sum(), OptimizerSettings(iterations=0), tmp_path, progress=False)
    assert res.history == [] and math.isnan(res.final_loss) and res.iterations_done == 0
    assert (tmp_path / "loss.png").exists()
    assert torch.load(res.checkpoint, weights_only=True)["done"]


def test_nonfinite_initial_parameter_is_reported_before_any_step():
    x = torch.tensor([1.0, float("nan")], requires_grad=True)
    calls = []
    with pytest.raises(NonFiniteError, match="value of parameter 'x' at stage 'main', iteration 0"):
        optimize({"x": x}, lambda i: calls.append(i) or (x ** 2).sum(), OptimizerSettings(iterations=3),
                 progress=False)
    assert calls == []


def test_csv_term_appearing_mid_stage(tmp_path):
    x = torch.tensor([2.0], requires_grad=True)

    def loss_fn(i):
        terms = {"fit": (x ** 2).sum()}
        if i >= 2:
            terms["reg"] = 0.25
        return (x ** 2).sum(), terms

    optimize({"x": x}, loss_fn, OptimizerSettings(lr=0.1, iterations=4, checkpoint_every=0), tmp_path,
             progress=False)
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["reg"] for r in rows] == ["", "", "0.25", "0.25"]
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]


def test_clip_by_value_then_norm():
    x = torch.tensor([30.0, 0.05, 4.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    optimize({"x": x}, lambda i: 0.5 * (x ** 2).sum(),
             OptimizerSettings(name="sgd", lr=1.0, iterations=1, clip_grad_value=1.0, clip_grad_norm=0.1,
                               checkpoint_every=0), progress=False)
    step = start - x.detach()
    expected = torch.tensor([1.0, 0.05, 1.0], dtype=torch.float64)
    assert torch.allclose(step, expected * 0.1 / expected.norm(), rtol=1e-5)
