"""Reference cases against experiments: the dam break of Martin & Moyce (1952) and the collapse of
a granular column (Lube et al. 2005; Lajeunesse et al. 2005), run as quasi-2-D slabs.

Both cases are a thin slab (``thick`` cells across y, free-slip walls on both sides) in a grid
with 3-node walls. Material that touches a domain wall starts one cell inside the wall band (its
first particle layer a quarter cell from node ``bound - 1``), which is where a material resting
against the band sits (``tests/sims/test_mpm_physics.py``, hydrostatic column). Placed at the
interior box instead (``bound`` cells from the faces), it first falls about a cell into the band:
the back wall of a dam break then pushes the column with a fraction of the force (mean
centre-of-mass acceleration 0.03 g over ``T < 0.2`` at CFL 0.3 instead of the potential-flow
0.23 g, and dt dependent), and a thin slab swells into its side bands and loses height. The
measurements and what they show are in ``docs/mpm.md`` (Validation against experiments);
``benchmarks/mpm_validation.py`` prints them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffworld.geometry.sdf import Box
from diffworld.sims.mpm.bodies import Body, build_model
from diffworld.sims.mpm.materials import lame, material
from diffworld.sims.mpm.solver import PARTICLE_PARAMS, Collider, GridSpec, State, Stepper

__all__ = ["MARTIN_MOYCE_T", "MARTIN_MOYCE_Z", "CollapseResult", "DamBreakResult", "column_collapse", "dam_break",
           "data_front_speed", "ideal_initial_acceleration", "ritter_front"]

G = 9.81  # [m/s^2]

#: Martin & Moyce (1952), Phil. Trans. R. Soc. Lond. A 244, 312-324, doi:10.1098/rsta.1952.0006:
#: surge front Z = x / a against T = t sqrt(2 g / a) for a water column of width a = 2.25 in
#: (0.05715 m) and height 2a (n^2 = 2), their table 2: the front at 1/4, 1/2, 1, 1.5, ... in from
#: the column's face. Values as tabulated in the Lethe example
#: ``examples/multiphysics/dam-break/dam-break-2d.py`` (github.com/chaos-polymtl/lethe) up to
#: T = 2.96; the last point (3.11, 3.89) as other public ports of the same table give it (they
#: agree with Lethe's to 0.02 in T). PySPH's independent digitization of their figure 3
#: (``pysph/examples/db_exp_data.py``, github.com/pypr/pysph) agrees within 3 % in Z.
MARTIN_MOYCE_T = (0.41, 0.84, 1.19, 1.43, 1.63, 1.82, 1.97, 2.20, 2.32, 2.50, 2.64, 2.82, 2.96, 3.11)
MARTIN_MOYCE_Z = (1.11, 1.23, 1.44, 1.67, 1.89, 2.11, 2.33, 2.56, 2.78, 3.00, 3.22, 3.44, 3.67, 3.89)

_MM_WIDTH = 0.05715  # [m] a = 2.25 in


def ritter_front(T: np.ndarray | float) -> np.ndarray | float:
    """Front of Ritter's shallow-water dam break on a dry bed, Z = x / a against T = t sqrt(2 g / a).

    The front runs at 2 sqrt(g h0); with h0 = 2a that is Z = 1 + 2T. Real and simulated fronts
    are slower (the shallow-water model ignores the vertical acceleration near the front).
    """
    return 1.0 + 2.0 * np.asarray(T)


def ideal_initial_acceleration(width: float, height: float, g: float = G, terms: int = 4000) -> float:
    """Horizontal acceleration [m/s^2] of the centre of mass of a released water column at t = 0+.

    Potential flow of an incompressible column (width ``width`` against a wall, height ``height``,
    on a floor, released from rest): the pressure q = p / (rho g) solves Laplace's equation with
    q = 0 on the free top and face, dq/dn = 0 on the wall, dq/dz = -1 on the floor. With
    k_n = (2n + 1) pi / (2 height), q = (height - z) - sum_n 2 / (height k_n^2) cos(k_n z)
    cosh(k_n (x + width)) / cosh(k_n width), and the wall's force per unit depth gives

        a_cm = g / (width height) (height^2 / 2 - sum_n 2 (-1)^n / (height k_n^3 cosh(k_n width))).

    Args:
        width: Column width a [m].
        height: Column height [m].
        g: Gravity [m/s^2].
        terms: Terms of the series (its terms fall like 1 / n^3).

    Returns:
        a_cm [m/s^2]; 0.2277 g for height = 2 width (a finite-difference Laplace solve agrees to 3e-6).
    """
    s = 0.0
    for n in range(terms):
        k = (2 * n + 1) * math.pi / (2 * height)
        s += 2 * (-1) ** n / (height * k ** 3 * math.cosh(min(k * width, 700.0)))
    return g / (width * height) * (height * height / 2 - s)


def _interp(t: np.ndarray, y: np.ndarray, at: float) -> float:
    return float(np.interp(at, t, y))


@dataclass
class DamBreakResult:
    """A dam-break run.

    Attributes:
        T: Dimensionless times t sqrt(2 g / a) of the samples, shape (S,).
        Z: Front x / a (leading particle's edge, from the wall), shape (S,).
        vcm: Horizontal velocity of the centre of mass [m/s], shape (S,).
        dt: Substep [s].
        cells: Cells across the width a.
        particles: Particle count.
        seconds: Wall-clock time of the run [s].
    """

    T: np.ndarray
    Z: np.ndarray
    vcm: np.ndarray
    dt: float
    cells: int
    particles: int
    seconds: float

    def front(self, T: float, shift: float = 0.0) -> float:
        """Z at time T of the experiment whose clock runs ``shift`` ahead of the release."""
        return _interp(self.T, self.Z, T - shift)

    def errors(self, shift: float = 0.0, T_min: float = 0.0) -> np.ndarray:
        """Relative front errors Z_sim / Z_data - 1 at the Martin & Moyce times >= T_min (and >= shift)."""
        return np.array([self.front(T, shift) / Z - 1 for T, Z in zip(MARTIN_MOYCE_T, MARTIN_MOYCE_Z)
                         if T >= max(T_min, shift)])

    def best_shift(self, T_min: float = 0.8) -> float:
        """Time shift (0 .. 0.6 in steps of 0.005) minimizing the RMS error over T >= T_min."""
        shifts = np.arange(0.0, 0.6001, 0.005)
        return float(min(shifts, key=lambda s: float(np.mean(self.errors(s, T_min) ** 2))))

    def front_speed(self, T0: float = 1.63, T1: float = 3.11, shift: float = 0.0) -> float:
        """dZ/dT fitted over [T0, T1] (least squares on 30 points)."""
        Ts = np.linspace(T0, T1, 30)
        return float(np.polyfit(Ts, [self.front(t, shift) for t in Ts], 1)[0])

    def acceleration(self, T0: float, T1: float) -> float:
        """Mean horizontal centre-of-mass acceleration [m/s^2] over [T0, T1] (least-squares slope of vcm)."""
        scale = math.sqrt(_MM_WIDTH / (2 * G))
        m = (self.T >= T0 - 1e-9) & (self.T <= T1 + 1e-9)
        return float(np.polyfit(self.T[m] * scale, self.vcm[m], 1)[0])


def data_front_speed(T0: float = 1.63, T1: float = 3.11) -> float:
    """dZ/dT of the Martin & Moyce data fitted over [T0, T1]."""
    pts = [(t, z) for t, z in zip(MARTIN_MOYCE_T, MARTIN_MOYCE_Z) if T0 - 1e-9 <= t <= T1 + 1e-9]
    return float(np.polyfit(*zip(*pts), 1)[0])


def dam_break(cells: int = 10, *, E: float = 1.0e5, cfl: float = 0.3, T_end: float = 3.2, every: float = 0.05,
              gate_speed: float | None = None, thick: int = 2, length: float = 5.0, prestress: bool = True,
              dtype: torch.dtype = torch.float32, device: str = "cpu") -> DamBreakResult:
    """The Martin & Moyce dam break (a = 0.05715 m, height 2a) as a slab of water, front against time.

    The column stands against the left wall (x) on the floor (z), ``thick`` cells deep in y; the
    tank runs ``length`` a to the right. Water is the ``water`` material (weakly compressible
    fluid law, no viscosity) with Young's modulus ``E`` (the fluid law reads lambda only: sound
    speed sqrt(lambda / rho) = 7.6 m/s at the default 1e5 Pa, Mach ~0.3 at the front). It
    starts at rest in hydrostatic compression (F = J^(1/3) I, p = rho g (h - z)) unless
    ``prestress`` is off.

    Args:
        cells: Cells across the column width a.
        E: Young's modulus of the water [Pa].
        cfl: dt = cfl dx / (c + 2 sqrt(2 g a)) (sound speed plus Ritter's front speed).
        T_end: Last dimensionless time.
        every: Sampling interval in T.
        gate_speed: None: instantaneous release. Else [m/s]: a 6-cell-thick box (the gate)
            holds the column's face and is lifted at this speed from t = 0; its bottom starts
            1.5 cells below the water's, so the opening at the floor starts at t = 1.5 dx /
            gate_speed.
        thick: Slab thickness in cells.
        length: Tank length beyond the wall, in column widths.
        prestress: Start in hydrostatic compression.
        dtype: float32 or float64.
        device: Torch device.

    Returns:
        The :class:`DamBreakResult`.
    """
    a = _MM_WIDTH
    dx = a / cells
    bound = 3
    inset = bound - 1  # material starts one cell inside the wall band: see the module docstring
    nx = int(math.ceil(length * cells)) + inset + bound + 1
    ny = 2 * inset + thick
    nz = 2 * cells + inset + bound + 4
    grid = GridSpec((0.0, 0.0, 0.0), dx, (nx + 1, ny + 1, nz + 1), bound)
    x0 = inset * dx
    water = material("water", E=E)
    column = Body(Box((a / 2, thick * dx / 2, a), (x0 + a / 2, x0 + thick * dx / 2, x0 + a)), water, ppc=8)
    _, lam = lame(torch.tensor(E), torch.tensor(water.nu))
    lam = float(lam)
    c = math.sqrt(lam / water.density)
    dt = cfl * dx / (c + 2 * math.sqrt(2 * G * a))
    cols = [Collider("box", size=(3 * dx, 1.0, 1.5 * a), friction=0.0, name="gate")] if gate_speed is not None else []
    model, state = build_model(dataclasses.replace(grid, bound=inset), [column], dt=dt, gravity=(0.0, 0.0, -G),
                               dtype=dtype, device=device, colliders=cols)
    model = dataclasses.replace(model, grid=grid)
    if prestress:
        z = state.x[:, 2].double()
        J = 1.0 - water.density * G * (x0 + 2 * a - z) / lam
        F = (J ** (1.0 / 3.0)).to(dtype)[:, None, None] * torch.eye(3, dtype=dtype, device=state.x.device)
        state = State(state.x, state.v, state.C, F.contiguous())
    scale = math.sqrt(a / (2 * G))  # t = T scale
    n_sub = int(round(T_end * scale / dt))
    stride = max(1, int(round(every * scale / dt)))
    stepper = Stepper(model)
    params = [model.params[k].contiguous() for k in PARTICLE_PARAMS]
    m = (model.params["density"] * model.params["volume"]).double()
    half = 0.5 * dx / 2  # half the particle spacing (8 per cell): the material's edge
    Ts, Zs, vs = [], [], []
    tau = None
    ctrl = None
    t0 = time.perf_counter()
    for s in range(n_sub + 1):
        if s % stride == 0:
            x = state.x.double()
            Ts.append(s * dt / scale)
            Zs.append(float((x[:, 0].max() + half - x0) / a))
            vs.append(float((m * state.v[:, 0].double()).sum() / m.sum()))
        if s == n_sub:
            break
        if gate_speed is not None:
            ctrl = torch.zeros(1, 13, dtype=dtype, device=state.x.device)
            ctrl[0, 0] = x0 + a + 3 * dx  # the gate's left face on the column's face
            ctrl[0, 1] = x0 + thick * dx / 2
            ctrl[0, 2] = (inset - 1.5) * dx + 1.5 * a + gate_speed * s * dt  # bottom 1.5 dx below the water
            ctrl[0, 6] = 1.0
            ctrl[0, 9] = gate_speed
        with torch.no_grad():
            state, tau, _ = stepper.substep(state, params, ctrl, step=s, tau=tau)
    return DamBreakResult(np.array(Ts), np.array(Zs), np.array(vs), dt, cells, model.n_particles,
                          time.perf_counter() - t0)


@dataclass
class CollapseResult:
    """A granular column collapse.

    Attributes:
        runout: (L_inf - L0) / L0 from the leading particle's edge at the end.
        profile: Final deposit height / h0 per half-cell column, as (x / L0, height / h0) pairs.
        t: Sample times [s], shape (S,).
        front: (x_front - L0) / L0 at the samples, shape (S,).
        kinetic: Kinetic energy [J] at the samples, shape (S,).
        dt: Substep [s].
        cells: Cells across the column height h0.
        particles: Particle count.
        seconds: Wall-clock time of the run [s].
    """

    runout: float
    profile: list = field(repr=False)
    t: np.ndarray = field(repr=False)
    front: np.ndarray = field(repr=False)
    kinetic: np.ndarray = field(repr=False)
    dt: float = 0.0
    cells: int = 0
    particles: int = 0
    seconds: float = 0.0

    def runout_at(self, height: float) -> float:
        """(x - L0) / L0 of the last deposit column at least ``height`` h0 thick."""
        last = 0.0
        for x, h in self.profile:
            if h >= height:
                last = x
        return last - 1.0


def column_collapse(cells: int = 10, *, aspect: float = 0.5, h0: float = 0.1, E: float = 1.0e5, nu: float = 0.2,
                    friction_angle: float = 25.0, density: float = 1600.0, floor: str = "friction",
                    floor_friction: float | None = None, cfl: float = 0.3, ppc: int = 8, t_end: float = 0.6,
                    every: float = 0.05, thick: int = 2, runout_max: float = 2.0,
                    dtype: torch.dtype = torch.float32, device: str = "cpu") -> CollapseResult:
    """Collapse of a planar column of sand (Drucker-Prager) against a back wall, final runout.

    A column h0 tall and L0 = h0 / aspect long stands against the left wall on the floor, ``thick``
    cells deep in y between free-slip side walls, and is released at rest. The floor is a plane
    collider on the floor band (so the side walls keep free slip): ``friction`` (Coulomb, mu =
    ``floor_friction``, default tan(friction_angle)), ``sticky``, or ``slip`` (the domain wall).

    Args:
        cells: Cells across the height h0.
        aspect: h0 / L0.
        h0: Column height [m].
        E, nu, friction_angle, density: The sand (Pa, -, degrees, kg/m^3).
        floor: ``friction``, ``sticky`` or ``slip``.
        floor_friction: Coulomb coefficient of a ``friction`` floor.
        cfl: dt = cfl dx / c (P-wave speed).
        ppc: Particles per cell (a cube: 1, 8, 27, ...).
        t_end: Duration [s].
        every: Sampling interval [s].
        thick: Slab thickness in cells.
        runout_max: Tank length beyond the column, in L0.
        dtype: float32 or float64.
        device: Torch device.

    Returns:
        The :class:`CollapseResult`.
    """
    if floor not in ("friction", "sticky", "slip"):
        raise ValueError(f"floor: expected 'friction', 'sticky' or 'slip', got {floor!r}")
    dx = h0 / cells
    bound = 3
    inset = bound - 1
    L0 = h0 / aspect
    nx = int(round(L0 / dx)) + int(math.ceil(runout_max * L0 / dx)) + inset + bound + 1
    ny = 2 * inset + thick
    nz = cells + inset + bound + 3
    grid = GridSpec((0.0, 0.0, 0.0), dx, (nx + 1, ny + 1, nz + 1), bound)
    x0 = inset * dx
    sand = material("sand", E=E, nu=nu, friction_angle=friction_angle, density=density)
    column = Body(Box((L0 / 2, thick * dx / 2, h0 / 2), (x0 + L0 / 2, x0 + thick * dx / 2, x0 + h0 / 2)), sand,
                  ppc=ppc)
    mu, lam = (float(v) for v in lame(torch.tensor(E), torch.tensor(nu)))
    dt = cfl * dx / math.sqrt((lam + 2 * mu) / density)
    cols = []
    if floor != "slip":
        mu_floor = math.tan(math.radians(friction_angle)) if floor_friction is None else floor_friction
        cols = [Collider("plane", friction=mu_floor, sticky=floor == "sticky", name="floor")]
    model, state = build_model(dataclasses.replace(grid, bound=inset), [column], dt=dt, gravity=(0.0, 0.0, -G),
                               dtype=dtype, device=device, colliders=cols)
    model = dataclasses.replace(model, grid=grid)
    ctrl = None
    if cols:
        ctrl = torch.zeros(1, 13, dtype=dtype, device=state.x.device)
        ctrl[0, 2] = (bound - 0.5) * dx  # the floor band's nodes 0 .. bound - 1 are inside
        ctrl[0, 6] = 1.0
    n_sub = int(round(t_end / dt))
    stride = max(1, int(round(every / dt)))
    stepper = Stepper(model)
    params = [model.params[k].contiguous() for k in PARTICLE_PARAMS]
    m = (model.params["density"] * model.params["volume"]).double()
    half = 0.5 * dx / round(ppc ** (1.0 / 3.0))
    ts, fronts, kin = [], [], []
    tau = None
    t0 = time.perf_counter()
    for s in range(n_sub + 1):
        if s % stride == 0 or s == n_sub:
            x = state.x.double()
            ts.append(s * dt)
            fronts.append(float((x[:, 0].max() + half - x0) / L0) - 1.0)
            kin.append(float(0.5 * (m * (state.v.double() ** 2).sum(1)).sum()))
        if s == n_sub:
            break
        with torch.no_grad():
            state, tau, _ = stepper.substep(state, params, ctrl, step=s, tau=tau)
    x = state.x.double()
    w = dx / 2
    col = ((x[:, 0] - x0) / w).floor().long().clamp_min(0)
    top = torch.full((int(col.max()) + 1,), -1.0, dtype=torch.float64)
    top.scatter_reduce_(0, col, x[:, 2] + half - x0, reduce="amax")
    profile = [(float((k + 1) * w / L0), float(h / h0)) for k, h in enumerate(top.tolist())]
    return CollapseResult(fronts[-1], profile, np.array(ts), np.array(fronts), np.array(kin), dt, cells,
                          model.n_particles, time.perf_counter() - t0)
