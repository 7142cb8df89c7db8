"""engine.problem: solve() runs any object with the Problem shape through the driver, replays its
state from the stage checkpoint on resume, and rejects objects that are not problems."""

import pytest
import torch

from diffworld.engine.driver import OptimizerSettings
from diffworld.engine.problem import BaseProblem, Problem, solve


class Quadratic(BaseProblem):
    """min |x - c|^2 with x kept in [-1, 1] by the projection; counts callbacks and replays."""

    stage = "quad"

    def __init__(self):
        self.x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        self.c = torch.tensor([0.5, -2.0, 0.25], dtype=torch.float64)
        self.calls, self.replayed = 0, []

    def params(self):
        return {"x": self.x}

    def loss_fn(self, iteration):
        return ((self.x - self.c) ** 2).sum(), {"first": self.x[0]}

    def project(self):
        self.x.clamp_(-1.0, 1.0)

    def callback(self, iteration, row):
        self.calls += 1

    def replay(self, checkpoint):
        self.replayed.append(checkpoint)


def test_solve_runs_a_problem_with_its_projection_and_callback(tmp_path):
    p = Quadratic()
    assert isinstance(p, Problem)
    settings = OptimizerSettings(name="adam", lr=0.1, iterations=200)
    result = solve(p, settings, tmp_path, progress=False)
    assert p.calls == 200 and len(result.history) == 200
    # the projection holds the second coordinate on its bound; the others reach the target
    assert torch.allclose(p.x.detach(), torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64), atol=1e-3)
    assert (tmp_path / "checkpoints" / "quad.pt").is_file()


def test_resume_replays_the_stage_checkpoint_and_keeps_the_result(tmp_path):
    settings = OptimizerSettings(name="adam", lr=0.1, iterations=20)
    first = Quadratic()
    solve(first, settings, tmp_path, progress=False)
    again = Quadratic()
    solve(again, settings, tmp_path, resume=True, progress=False)
    assert again.replayed == [tmp_path / "checkpoints" / "quad.pt"]
    assert torch.equal(again.x.detach(), first.x.detach())  # a finished stage restores its parameters


def test_solve_rejects_what_is_not_a_problem():
    with pytest.raises(TypeError, match="expected a Problem"):
        solve(object(), OptimizerSettings(name="adam", lr=0.1, iterations=1))
