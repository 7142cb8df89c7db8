"""Benchmark: a neural constitutive law (NCLaw's networks) inside the MPM, forward and
forward + backward per step at about 1k, 10k and 100k particles, diffworld vs a minimal port of
the reference's scheme, same run, same sizes.

Setup (issue 16 item 4; facts from shared/reference/nclaw.md): NCLaw's training scene (a 0.5 m
cube thrown and spun in the unit box, 20^3 grid, dt 5e-4) with a plasticine truth for the
particles' density; 1 and 10 particles per cell on the 20^3 grid give 1,000 and 9,261 particles, 12
per cell on a 40^3 grid 97,336. Both sides use the same MPM kernels (diffworld's Warp P2G, grid, G2P) and
NCLaw's architecture (13 invariants, bias-free MLP 13-64-64-9 with GELU, elastic and plastic
networks), float32, with the same weights:

* baseline (the reference's scheme): the invariants from ``torch.linalg.svd`` with its autograd
  (NaN where singular values repeat, e.g. every particle at the start: zeroed with
  ``nan_to_num`` as the reference does), the MLP in torch, between the Warp kernels;
* ours: the same networks through :mod:`diffworld.sims.constitutive.neural`: the signed SVD in a
  Warp kernel (float64 inside) and its adjoint by the polar decomposition's closed form.

Each timed run starts from the truth's state after 300 steps (past the cube's impact: F away
from the identity, where an iterative SVD does its full work). Columns: ms per step forward
(``mpm.rollout`` under ``no_grad``), and forward + backward (the rollout with the law's weights
requiring grad, then ``backward()`` of the final positions' squared sum), ``--steps`` steps (fewer at larger sizes, the same particle-steps), in ``--rounds`` rounds that
time both sides in turn (a shared machine drifts by tens of percent over minutes: pairing the
sides in each round keeps that drift out of the ratio); medians, and ratio = the median of the
rounds' baseline / ours.

Usage::

    python benchmarks/nclaw.py [--steps 50] [--rounds 15] [--quick] [--baseline-threads 2]

Runtime on a 2-core CPU: about two and a half minutes (``--quick``: 1k and 10k only, under a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffworld.engine.runtime import init_warp
from diffworld.sims import mpm
from diffworld.sims.constitutive.neural import InvariantElasticity, InvariantPlasticity, NeuralLaw, _sym
from diffworld.tasks.constitutive.config import ConstitutiveLearningTask
from diffworld.tasks.constitutive.training import build_setup


def _torch_invariants(F: torch.Tensor):
    """The reference's way: torch.linalg.svd with autograd, sign fixes by torch ops."""
    U, s, Vh = torch.linalg.svd(F)
    V = Vh.transpose(-1, -2)
    du, dv = torch.linalg.det(U), torch.linalg.det(V)
    fu = torch.where(du < 0, -1.0, 1.0).to(F.dtype)
    fv = torch.where(dv < 0, -1.0, 1.0).to(F.dtype)
    U = torch.cat([U[..., :2], U[..., 2:] * fu[..., None, None]], -1)
    V = torch.cat([V[..., :2], V[..., 2:] * fv[..., None, None]], -1)
    s = torch.cat([s[..., :2], s[..., 2:] * (fu * fv)[..., None]], -1)
    R = U @ V.transpose(-1, -2)
    eye = torch.eye(3, dtype=F.dtype, device=F.device)
    C = F.transpose(-1, -2) @ F - eye
    J = s.prod(-1, keepdim=True)
    x = torch.cat([s - 1.0, C.reshape(*F.shape[:-2], 9), J - 1.0], -1)
    if x.requires_grad:
        x.register_hook(lambda g: torch.nan_to_num(g))
    if R.requires_grad:
        R.register_hook(lambda g: torch.nan_to_num(g))
    return x, R


class BaselineElasticity(InvariantElasticity):
    def forward(self, F):
        x, R = _torch_invariants(F)
        return self.output_scale * (R @ _sym(self._net(x)) @ F.transpose(-1, -2))


class BaselinePlasticity(InvariantPlasticity):
    def forward(self, F):
        x, R = _torch_invariants(F)
        return F + self.alpha * R @ _sym(self._net(x))


class _NanToNumF(torch.autograd.Function):
    """The reference zeroes NaN gradients of the deformation gradient (its SVD's at repeated
    singular values) before they reach the simulator."""

    @staticmethod
    def forward(ctx, F):
        return F.view_as(F)

    @staticmethod
    def backward(ctx, g):
        return torch.nan_to_num(g)


class BaselineLaw(NeuralLaw):
    def stress(self, F, params):
        return self.elastic(_NanToNumF.apply(F))

    def project(self, F, params):
        return self.plastic(_NanToNumF.apply(F))


def _laws(seed: int = 0):
    torch.manual_seed(seed)
    ours = NeuralLaw(InvariantElasticity(output_scale=3e5), InvariantPlasticity())
    with torch.no_grad():  # a law that does something (small stresses, small plastic flow)
        ours.elastic.mlp.layers[-1].weight.mul_(0.01)
    base = BaselineLaw(BaselineElasticity(output_scale=3e5), BaselinePlasticity())
    base.load_state_dict(ours.state_dict())
    return ours.float(), base.float()


def _time(model, state, law, steps: int, backward: bool) -> float:
    """ms per step of one ``steps``-step rollout (with ``backward``: and its backward)."""
    law.zero_grad()
    t = time.perf_counter()
    if backward:
        out = mpm.rollout(model, state, steps, None, window=steps)
        (out.states[-1].x ** 2).sum().backward()
    else:
        with torch.no_grad():
            mpm.rollout(model, state, steps, None, window=steps)
    return (time.perf_counter() - t) / steps * 1e3


def _rounds(sides: dict, state, steps: int, rounds: int, baseline_threads: int) -> dict:
    """Per side and mode (forward, forward + backward): the ms per step of each round. A round
    times every side and mode once, in turn, so that the machine's drift (10-50 % over minutes on
    a shared VM) reaches both sides alike; a warm-up round is not counted."""
    times = {(name, bwd): [] for name in sides for bwd in (False, True)}
    for r in range(rounds + 1):
        for name, (model, law) in sides.items():
            torch.set_num_threads(baseline_threads if name == "baseline" else 1)
            for bwd in (False, True):
                t = _time(model, state, law, steps, bwd)
                if r:
                    times[(name, bwd)].append(t)
    torch.set_num_threads(1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run (1k; fewer at larger sizes)")
    ap.add_argument("--quick", action="store_true", help="1k and 10k particles only")
    ap.add_argument("--baseline-threads", type=int, default=1,
                    help="torch threads while the baseline runs (ours always runs torch on one thread; the "
                         "solver's own CPU threads serve both)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (each times both sides once, in turn)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_warp()
    # (grid resolution, particles per cell): ~1k and ~10k on NCLaw's 20^3 grid, ~100k on a 40^3 one
    sizes = [(20, 1), (20, 10)] if args.quick else [(20, 1), (20, 10), (40, 12)]
    print(f"baseline on {args.baseline_threads} torch thread(s); medians of {args.rounds} rounds; ratio = median of "
          "the rounds' baseline / ours (their range in brackets)\n")
    print("| particles | baseline fwd [ms/step] | ours fwd | ratio | baseline fwd+bwd [ms/step] | ours fwd+bwd | "
          "ratio | max abs diff of x after the run [m] |")
    print("|---|---|---|---|---|---|---|---|")
    per_particle = []
    for res, ppc in sizes:
        task = ConstitutiveLearningTask.model_validate({"data": {"material": {"name": "plasticine"}, "ppc": ppc,
                                                                 "resolution": res}})
        model, state = build_setup(task.data, torch.float32, "cpu")
        # time from a deformed state (the built-in plasticine after 300 steps, past the cube's
        # impact on the floor): at the start every F is the identity, which flatters any SVD that
        # iterates (ours converges in zero sweeps there; LAPACK's cost does not change)
        with torch.no_grad():
            state = mpm.rollout(model, state, 300, None, window=300).states[-1]
        ours, base = _laws()
        m_ours, m_base = mpm.use_law(model, ours, "cube"), mpm.use_law(model, base, "cube")
        steps = max(2, args.steps * 1000 // model.n_particles)
        with torch.no_grad():
            xa = mpm.rollout(m_ours, state, steps, None, window=steps).states[-1].x
            xb = mpm.rollout(m_base, state, steps, None, window=steps).states[-1].x
        diff = float((xa - xb).abs().max())
        t = _rounds({"baseline": (m_base, base), "ours": (m_ours, ours)}, state, steps, args.rounds,
                    args.baseline_threads)
        cols = []
        for bwd in (False, True):
            b, o = t[("baseline", bwd)], t[("ours", bwd)]
            ratios = [x / y for x, y in zip(b, o)]
            cols.append(f"{statistics.median(b):.2f} | {statistics.median(o):.2f} | {statistics.median(ratios):.2f} "
                        f"({min(ratios):.2f}-{max(ratios):.2f})")
        n = model.n_particles
        per_particle.append((n, statistics.median(t[("ours", True)]) / n * 1e3))
        print(f"| {n:,} | {cols[0]} | {cols[1]} | {diff:.1e} |", flush=True)
    print("\nours fwd+bwd per particle [us/step]: " + ", ".join(f"{n:,}: {t:.2f}" for n, t in per_particle))


if __name__ == "__main__":
    main()
