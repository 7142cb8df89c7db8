"""The engine's checkpointed rollout on a toy simulator, against plain autograd of the same
steps: states and gradients for every window size, recording inside windows, a state entry the
simulator derives in its first step, and keep_last_window."""

import pytest
import torch

from diffworld.engine.rollout import checkpointed_rollout

DT = 0.1


class Toy:
    """x' = x + dt (-k s + u), with s = sin(x) carried in the state (derived from x when None)."""

    def step(self, state, params, control, index, keep):
        x, s = state
        (k,) = params
        computed = s is None
        if computed:
            s = torch.sin(x)
        x1 = x + DT * (-k * s + control)
        return (x1, torch.sin(x1)), ((x, s, x1, computed) if keep else None)

    def step_adjoint(self, saved, params, adj_out, adj_params, adj_control):
        x, s, x1, computed = saved
        (k,) = params
        gx1 = adj_out[0] if adj_out[0] is not None else torch.zeros_like(x1)
        if adj_out[1] is not None:
            gx1 = gx1 + adj_out[1] * torch.cos(x1)
        adj_params[0] += (-DT * s * gx1).sum()
        adj_control += DT * gx1
        gx, gs = gx1.clone(), -DT * k * gx1
        if computed:
            return gx + gs * torch.cos(x), None
        return gx, gs


def _reference(x0, control, k, record):
    xs, x = [x0], x0
    s = torch.sin(x)
    for t in range(control.shape[0]):
        x = x + DT * (-k * s + control[t])
        s = torch.sin(x)
        if (t + 1) % record == 0 or t + 1 == control.shape[0]:
            xs.append(x)
    return xs


def _loss(xs):
    return sum((i + 1) * (x ** 3).sum() for i, x in enumerate(xs[1:]))


@pytest.mark.parametrize("window", [1, 3, 5, 12, 40])
@pytest.mark.parametrize("keep_last", [True, False])
def test_matches_plain_autograd_for_every_window(window, keep_last):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, generator=g, dtype=torch.float64)
    control = torch.randn(12, 7, generator=g, dtype=torch.float64)
    k = torch.tensor(0.7, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x0, control, k)]
    ref = _reference(*ins, record=4)
    ref_grads = torch.autograd.grad(_loss(ref), ins)
    ins2 = [t.clone().requires_grad_() for t in (x0, control, k)]
    traj = checkpointed_rollout(Toy(), (ins2[0], None), 12, ins2[1], [ins2[2]], window=window, record_every=4,
                                keep_last_window=keep_last)
    assert traj.steps == [0, 4, 8, 12]
    got = [st[0] for st in traj.states]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same arithmetic, bit for bit
    grads = torch.autograd.grad(_loss(got), ins2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_check_sees_every_recorded_state_in_order():
    seen = []
    x0 = torch.zeros(3, dtype=torch.float64)
    checkpointed_rollout(Toy(), (x0, None), 10, torch.ones(10, 3, dtype=torch.float64),
                         [torch.tensor(1.0, dtype=torch.float64)], window=4, record_every=3, first_index=100,
                         check=lambda st, i: seen.append(i))
    assert seen == [103, 106, 109, 110]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window >= 1"):
        checkpointed_rollout(Toy(), (torch.zeros(1), None), 3, torch.zeros(3, 1), [torch.tensor(1.0)], window=0)
