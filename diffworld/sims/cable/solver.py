"""The XPBD rope step on Warp kernels (:mod:`diffworld.sims.cable.kernels`) and its adjoint.

:class:`RopeStepper` runs steps of one :class:`~diffworld.sims.cable.model.Model`. A step that
must be differentiated (``keep=True``) copies its inputs into fresh Warp arrays with gradient
buffers, records its launches on a Warp tape and allocates a new array for every pass (contract
3: nothing a recorded kernel read is overwritten); its adjoint seeds the output gradients,
replays the tape and hands the input gradients back. Forces held over the step (the table's
penalty contact and any ``external`` forces, e.g. from a coupled gel) enter the prediction; the
table's forces are computed by torch and differentiated by autograd.

Parameters of a step, in :data:`STEP_PARAMS` order: ``mass`` (N,) [kg] (derived from the linear
density by torch, so its gradient flows), ``stretch_compliance`` (N-1,) [m/N],
``bend_compliance`` (N-2,), ``damping`` (1,) [1/s], ``gravity`` (3,) [m/s^2]; then, with a
table, ``k_n``, ``k_d``, ``k_t``, ``mu``, ``eps_v`` of its contact (0-d).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch

from diffworld.engine.bridge import launch
from diffworld.engine.runtime import init_warp, warp_device
from diffworld.sims.cable.kernels import KERNELS
from diffworld.sims.cable.model import Model
from diffworld.sims.fem.contact import ContactParams, RigidObject, contact_forces

__all__ = ["GROUND_PARAMS", "RopeStepper", "STEP_PARAMS"]

STEP_PARAMS = ("mass", "stretch_compliance", "bend_compliance", "damping", "gravity")
GROUND_PARAMS = ("k_n", "k_d", "k_t", "mu", "eps_v")


class _Saved(NamedTuple):
    """What the adjoint of one step reads."""

    tape: object
    x: torch.Tensor  # input state (for the table's forces)
    v: torch.Tensor
    grads_in: dict  # name -> gradient buffer (torch) of each input array
    grads_out: tuple  # gradient buffers of x', v'
    keep_alive: list  # the torch memory the tape's arrays live in


class RopeStepper:
    """Runs XPBD steps of one rope model with step ``dt`` [s].

    Args:
        model: The model.
        dt: Step [s] > 0.
    """

    def __init__(self, model: Model, dt: float) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"RopeStepper: expected 'model' a cable.Model, got {type(model).__name__}")
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0 or dt == float("inf"):
            raise ValueError(f"RopeStepper: expected 'dt' a finite number > 0 [s], got {dt!r}")
        wp = init_warp()
        self._wp = wp
        self.model = model
        self.dt_value = float(dt)
        self.device, self.dtype = model.device, model.dtype
        self._wdev = warp_device(self.device)
        f64 = model.dtype == torch.float64
        self.k = KERNELS["float64" if f64 else "float32"]
        self._scalar = wp.float64 if f64 else wp.float32
        self._vec3 = wp.vec3d if f64 else wp.vec3f
        self.dt = self._scalar(dt)
        n = model.n_particles
        slot = torch.full((n,), -1, dtype=torch.int32, device=self.device)
        slot[model.pinned] = torch.arange(model.pinned.numel(), dtype=torch.int32, device=self.device)
        self.slot_t = slot.contiguous()
        self.slot = wp.from_torch(self.slot_t, dtype=wp.int32)
        self.n_bend = n - 2 if model.bending != "none" else 0
        self.all_particles = torch.arange(n, device=self.device)
        if model.ground is not None:
            self.ground_origin = torch.tensor([0.0, 0.0, model.ground.height + model.radius], dtype=self.dtype,
                                              device=self.device)

    # -- forces held over a step ---------------------------------------------------------------------

    def ground_forces(self, x: torch.Tensor, v: torch.Tensor, cp: Sequence[torch.Tensor]) -> torch.Tensor:
        """The table's penalty forces on the particles [N], (N, 3) (differentiable by torch)."""
        g = self.model.ground
        t = g.params
        params = ContactParams(*cp, t.penetration_width, t.damping_width, t.friction_exponent)
        return contact_forces(x, v, self.all_particles, RigidObject.plane(self.ground_origin), params).node_forces

    # -- arrays ---------------------------------------------------------------------------------------

    def _new(self, shape, vec: bool, keep: bool, alive: list, zero: bool = False):
        """A fresh Warp array on fresh torch memory (with a gradient buffer when ``keep``)."""
        wp = self._wp
        t = (torch.zeros if zero else torch.empty)(shape, dtype=self.dtype, device=self.device)
        alive.append(t)
        dtype = self._vec3 if vec else self._scalar
        if not keep:
            return wp.from_torch(t, dtype=dtype)
        g = torch.zeros_like(t)
        alive.append(g)
        return wp.from_torch(t, dtype=dtype, requires_grad=True, grad=g)

    def _input(self, name: str, t: torch.Tensor, vec: bool, keep: bool, alive: list, grads: dict):
        """A Warp view of an input: a copy with a gradient buffer when ``keep`` (the tape re-reads
        it in backward, and the caller may reuse its tensor), else the tensor itself."""
        wp = self._wp
        t = t.detach().contiguous()
        if vec:
            t = t.reshape(-1, 3)
        dtype = self._vec3 if vec else self._scalar
        if not keep:
            alive.append(t)
            return wp.from_torch(t, dtype=dtype)
        c = t.clone()
        g = torch.zeros_like(c)
        alive += [c, g]
        grads[name] = g
        return wp.from_torch(c, dtype=dtype, requires_grad=True, grad=g)

    # -- the step ---------------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, v: torch.Tensor, params: Sequence[torch.Tensor], control: torch.Tensor | None,
             keep: bool = False, external: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, _Saved | None]:
        """One XPBD step from (x, v).

        Args:
            x, v: State [m], [m/s], (N, 3).
            params: :data:`STEP_PARAMS` (then :data:`GROUND_PARAMS` with a table).
            control: Pinned targets (3 P,) [m] at the end of the step (None without pinned).
            keep: Record what the adjoint needs.
            external: Extra forces on the particles [N], (N, 3), held over the step (None: none).

        Returns:
            x', v' and, when ``keep``, the step's saved intermediates.
        """
        m = self.model
        n = m.n_particles
        mass, sc, bc, damping, gravity = params[:5]
        with torch.no_grad():
            f = torch.zeros((n, 3), dtype=self.dtype, device=self.device)
            if m.ground is not None:
                f = f + self.ground_forces(x, v, params[5:10])
            if external is not None:
                if tuple(external.shape) != (n, 3):
                    raise ValueError(f"RopeStepper.step: expected 'external' of shape ({n}, 3), got "
                                     f"{tuple(external.shape)}")
                f = f + external.to(self.dtype)
        target = (control if control is not None and control.numel() else
                  torch.zeros(3, dtype=self.dtype, device=self.device))
        alive: list = []
        grads: dict = {}
        k, run, dt = self.k, self._launch, self.dt
        inp = lambda name, t, vec: self._input(name, t, vec, keep, alive, grads)  # noqa: E731
        new = lambda shape, vec, zero=False: self._new(shape, vec, keep, alive, zero)  # noqa: E731
        tape = self._wp.Tape() if keep else None
        with (tape if keep else contextlib.nullcontext()):
            wx, wv = inp("x", x, True), inp("v", v, True)
            wmass, wsc = inp("mass", mass, False), inp("stretch_compliance", sc, False)
            wdamp, wgrav = inp("damping", damping.reshape(1), False), inp("gravity", gravity, True)
            wtarget, wf = inp("control", target, True), inp("external", f, True)
            rest = self._wp.from_torch(m.rest_length.detach().contiguous(), dtype=self._scalar)
            w = new(n, False)
            run(k["inverse_mass"], n, [wmass, self.slot, w])
            xc = new((n, 3), True)
            run(k["predict"], n, [wx, wv, w, wf, self.slot, wtarget, wgrav, wdamp, dt, xc])
            lam_s = new(n - 1, False, zero=True)
            if self.n_bend:
                wbc = inp("bend_compliance", bc, False)
                angle = m.bending == "angle"
                lam_b = new((self.n_bend, 3) if angle else self.n_bend, angle, zero=True)
                brest = None if angle else self._wp.from_torch(m.bend_rest.detach().contiguous(), dtype=self._scalar)
            for _ in range(m.iterations):
                for color in (0, 1):
                    x2, l2 = new((n, 3), True), new(n - 1, False)
                    run(k["stretch_color"], n, [xc, w, rest, wsc, lam_s, color, dt, x2, l2])
                    xc, lam_s = x2, l2
                if self.n_bend:
                    if angle:
                        for color in (0, 1, 2):
                            x2, l2 = new((n, 3), True), new((self.n_bend, 3), True)
                            run(k["bend_angle_color"], n, [xc, w, wbc, lam_b, color, dt, x2, l2])
                            xc, lam_b = x2, l2
                    else:
                        for color in (0, 1):
                            x2, l2 = new((n, 3), True), new(self.n_bend, False)
                            run(k["bend_distance_color"], n, [xc, w, brest, wbc, lam_b, color, dt, x2, l2])
                            xc, lam_b = x2, l2
            x1 = torch.empty((n, 3), dtype=self.dtype, device=self.device)
            v1 = torch.empty_like(x1)
            if keep:
                gx1, gv1 = torch.zeros_like(x1), torch.zeros_like(v1)
                wx1 = self._wp.from_torch(x1, dtype=self._vec3, requires_grad=True, grad=gx1)
                wv1 = self._wp.from_torch(v1, dtype=self._vec3, requires_grad=True, grad=gv1)
            else:
                wx1, wv1 = self._wp.from_torch(x1, dtype=self._vec3), self._wp.from_torch(v1, dtype=self._vec3)
            run(k["finish"], n, [wx, xc, dt, wx1, wv1])
        if not keep:
            return x1, v1, None
        # x1, v1 are read by nothing in the tape, but the caller must not write them: hand out copies
        return x1.clone(), v1.clone(), _Saved(tape, x.detach(), v.detach(), grads, (gx1, gv1), alive)

    def _launch(self, kernel, dim, inputs) -> None:
        launch(kernel, dim, inputs, self.device)

    # -- adjoint -------------------------------------------------------------------------------------------

    def step_adjoint(self, s: _Saved, params: Sequence[torch.Tensor], adj_x1: torch.Tensor | None,
                     adj_v1: torch.Tensor | None, adj_params: Sequence[torch.Tensor], adj_control: torch.Tensor | None,
                     adj_external: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of :meth:`step`: d loss / d (x, v) from d loss / d (x', v') (None: zero);
        accumulates into ``adj_params`` (same order as ``params``), ``adj_control`` (the step's
        row) and, when given, ``adj_external`` (N, 3) (d loss / d the step's ``external``)."""
        gx1, gv1 = s.grads_out
        if adj_x1 is not None:
            gx1.copy_(adj_x1.reshape(gx1.shape))
        if adj_v1 is not None:
            gv1.copy_(adj_v1.reshape(gv1.shape))
        s.tape.backward()
        g = s.grads_in
        adj_x, adj_v = g["x"].clone(), g["v"].clone()
        adj_params[0].add_(g["mass"])
        adj_params[1].add_(g["stretch_compliance"])
        if "bend_compliance" in g:
            adj_params[2].add_(g["bend_compliance"])
        adj_params[3].add_(g["damping"].reshape(adj_params[3].shape))
        adj_params[4].add_(g["gravity"].reshape(3))
        if adj_control is not None and adj_control.numel():
            adj_control.add_(g["control"].reshape(-1)[:adj_control.numel()])
        adj_f = g["external"]
        if adj_external is not None:
            adj_external.add_(adj_f)
        if self.model.ground is not None:
            with torch.enable_grad():
                xg, vg = s.x.detach().requires_grad_(True), s.v.detach().requires_grad_(True)
                cg = [t.detach().requires_grad_(True) for t in params[5:10]]
                f = self.ground_forces(xg, vg, cg)
                grads = torch.autograd.grad(f, [xg, vg, *cg], adj_f, allow_unused=True)
            gx, gv, *gc = grads
            if gx is not None:
                adj_x += gx
            if gv is not None:
                adj_v += gv
            for a, gi in zip(adj_params[5:10], gc):
                if gi is not None:
                    a.add_(gi.reshape(a.shape))
        s.tape.reset()
        return adj_x, adj_v
