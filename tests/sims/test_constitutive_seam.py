"""The constitutive seam: built-in laws run through the torch path give the Warp path's trajectory
and gradients to round-off (float64); a law with its own torch parameters gets their gradients
through the checkpointed rollout (vs central finite differences), independently of the window;
the law device functions are importable by another kernel module; bad bindings are rejected."""

import pytest
import torch
import warp as wp

from diffworld.engine.runtime import init_warp
from diffworld.geometry.sdf import Box
from diffworld.sims import mpm
from diffworld.sims.constitutive import LAWS, BuiltinTorchLaw, TorchLaw, lame
from diffworld.sims.constitutive import warp_laws

T = 24


def _scene(dtype=torch.float64):
    grid = mpm.GridSpec.make((0, 0, 0), (1, 1, 1), resolution=12)
    bodies = [mpm.Body(Box((0.09, 0.09, 0.09), (0.38, 0.4, 0.36)), mpm.material("neo_hookean", E=3e3), ppc=8,
                       velocity=(0.3, 0.1, -0.4), name="jelly"),
              mpm.Body(Box((0.09, 0.09, 0.07), (0.6, 0.58, 0.34)), mpm.material("water", E=2e3), ppc=8,
                       velocity=(-0.2, 0.0, 0.0), name="water")]
    cols = [mpm.Collider("sphere", size=(0.08, 0, 0), friction=0.3, softness=50.0)]
    model, state = mpm.build_model(grid, bodies, dt=2e-3, dtype=dtype, colliders=cols)
    ctrl = torch.zeros(T, 1, 13, dtype=dtype)
    ctrl[:, 0, :3] = torch.tensor([0.5, 0.32, 0.5])
    ctrl[:, 0, 6] = 1.0
    ctrl[:, 0, 7] = 0.4
    return model, state, ctrl


def _run(model, state, ctrl, window):
    """Loss of a rollout and its gradients w.r.t. the initial velocity, E, nu and the control."""
    v0 = state.v.clone().requires_grad_()
    E = model.params["E"].clone().requires_grad_()
    nu = model.params["nu"].clone().requires_grad_()
    c = ctrl.clone().requires_grad_()
    out = mpm.rollout(model, mpm.State(state.x, v0, state.C, state.F), T, c, window=window,
                      params={"E": E, "nu": nu}, record_every=8)
    gen = torch.Generator().manual_seed(3)
    loss = sum((s.x * torch.randn(s.x.shape, generator=gen, dtype=s.x.dtype)).sum()
               + (s.F * torch.randn(s.F.shape, generator=gen, dtype=s.F.dtype)).sum() for s in out.states[1:])
    loss.backward()
    return out, (v0.grad, E.grad, nu.grad, c.grad)


def test_builtin_laws_through_the_torch_seam_match_the_warp_path():
    model, state, ctrl = _scene()
    torch_model = mpm.use_law(mpm.use_law(model, BuiltinTorchLaw("neo_hookean"), "jelly"),
                              BuiltinTorchLaw("fluid"), "water")
    warp_out, warp_grads = _run(model, state, ctrl, window=5)
    torch_out, torch_grads = _run(torch_model, state, ctrl, window=5)
    for a, b in zip(warp_out.states, torch_out.states):
        for name, ta, tb in zip(mpm.State._fields, a, b):
            scale = ta.abs().max().clamp_min(1e-30)
            assert (ta - tb).abs().max() / scale < 1e-12, name
    for name, ga, gb in zip(("v0", "E", "nu", "control"), warp_grads, torch_grads):
        scale = ga.abs().max()
        assert scale > 0, name
        assert (ga - gb).abs().max() / scale < 1e-9, (name, float((ga - gb).abs().max() / scale))


class LearnedNeoHookean(TorchLaw):
    """Neo-Hookean whose shear modulus is scaled by a small network of the invariants, with a
    learned yield-free volumetric return map: parameters that only a torch law has."""

    material_parameters = ("E", "nu")

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        self.relax = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def stress(self, F, params):
        mu, lam = lame(params["E"], params["nu"])
        B = F @ F.transpose(-1, -2)
        J = torch.linalg.det(F)
        feats = torch.stack([B.diagonal(dim1=-2, dim2=-1).sum(-1) - 3, torch.log(J)], -1)
        scale = 1 + 0.5 * torch.tanh(self.net(feats))[:, 0]
        eye = torch.eye(3, dtype=F.dtype).expand_as(F)
        return (mu * scale)[:, None, None] * (B - eye) + (lam * torch.log(J))[:, None, None] * eye

    def project(self, F, params):
        # pull F towards its volumetric part by a learned fraction (differentiable, SVD-free)
        J = torch.linalg.det(F)
        iso = J.pow(1 / 3)[:, None, None] * torch.eye(3, dtype=F.dtype)
        a = torch.sigmoid(self.relax) * 0.1
        return (1 - a) * F + a * iso


def _module_loss(model, state, ctrl, window):
    out = mpm.rollout(model, state, T, ctrl, window=window, record_every=8)
    gen = torch.Generator().manual_seed(5)
    return sum((s.x * torch.randn(s.x.shape, generator=gen, dtype=s.x.dtype)).sum()
               + (s.v * torch.randn(s.v.shape, generator=gen, dtype=s.v.dtype)).sum() for s in out.states[1:])


def test_torch_law_parameters_get_gradients_that_match_finite_differences():
    model, state, ctrl = _scene()
    law = LearnedNeoHookean()
    bound = mpm.use_law(model, law, "jelly")
    params = list(law.parameters())
    _module_loss(bound, state, ctrl, window=7).backward()
    grads = [p.grad.clone() for p in params]
    assert all(torch.isfinite(g).all() for g in grads)
    gen = torch.Generator().manual_seed(11)
    eps = 1e-6
    for _ in range(2):
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum((d * d).sum() for d in dirs))
        dirs = [d / norm for d in dirs]
        analytic = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.add_(sign * eps * d)
                values.append(float(_module_loss(bound, state, ctrl, window=7)))
                for p, d in zip(params, dirs):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-5 * abs(numeric), (analytic, numeric)


def test_torch_law_gradients_do_not_depend_on_the_window():
    model, state, ctrl = _scene()
    law = LearnedNeoHookean()
    bound = mpm.use_law(model, law, "jelly")
    grads = []
    for window in (3, 8, T):
        law.zero_grad()
        _module_loss(bound, state, ctrl, window).backward()
        grads.append([p.grad.clone() for p in law.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert (a - b).abs().max() <= 1e-10 * a.abs().max()


def test_law_device_functions_are_importable_by_another_kernel_module():
    """A kernel outside the MPM (as the FEM will write) calls the module-level law functions in
    both precisions; they agree with the torch references."""
    init_warp()
    gen = torch.Generator().manual_seed(0)
    F = torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(64, 3, 3, generator=gen, dtype=torch.float64)
    E = torch.full((64,), 2e3, dtype=torch.float64)
    nu = torch.full((64,), 0.3, dtype=torch.float64)
    for dtype, wdtype, tol in ((torch.float64, wp.float64, 1e-12), (torch.float32, wp.float32, 1e-5)):
        mat33 = wp.types.matrix((3, 3), wdtype)

        @wp.kernel
        def piola(F: wp.array(dtype=mat33), E: wp.array(dtype=wdtype), nu: wp.array(dtype=wdtype),
                  out: wp.array(dtype=mat33)):
            i = wp.tid()
            mu, lam = warp_laws.lame(E[i], nu[i])
            out[i] = warp_laws.neo_hookean_stress(F[i], mu, lam) * wp.inverse(wp.transpose(F[i]))

        Fw = wp.from_torch(F.to(dtype).contiguous(), dtype=mat33)
        out = wp.zeros(64, dtype=mat33)
        wp.launch(piola, 64, [Fw, wp.from_torch(E.to(dtype)), wp.from_torch(nu.to(dtype))], [out])
        P = wp.to_torch(out).double()
        ref = LAWS["neo_hookean"].stress(F, dict(E=E, nu=nu)) @ torch.linalg.inv(F).transpose(-1, -2)
        assert (P - ref).abs().max() / ref.abs().max() < tol


def test_use_law_rejects_bad_bindings():
    model, state, ctrl = _scene()
    with pytest.raises(ValueError, match="body: expected one of"):
        mpm.use_law(model, BuiltinTorchLaw("neo_hookean"), "nope")
    with pytest.raises(ValueError, match="float32"):
        mpm.use_law(model, LearnedNeoHookean().float(), "jelly")
    bound = mpm.use_law(model, BuiltinTorchLaw("neo_hookean"), "jelly")
    with pytest.raises(ValueError, match="already has a torch law"):
        mpm.use_law(bound, BuiltinTorchLaw("neo_hookean"), "jelly")

    class Bad(TorchLaw):
        material_parameters = ("stiffness",)

    with pytest.raises(ValueError, match="unknown \\['stiffness'\\]"):
        mpm.use_law(model, Bad(), "jelly")
    with pytest.raises(ValueError, match="law: expected a TorchLaw"):
        mpm.use_law(model, torch.nn.Linear(1, 1), "jelly")
