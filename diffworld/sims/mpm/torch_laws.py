"""The MPM solver's side of torch laws (``model.torch_laws``): each substep, the rows of the
particles on a learned or user-written torch law get their return map and stress from it, with
their adjoint by autograd or, for a law with its own ``substep_stage`` (NCLaw's networks,
:class:`~diffworld.sims.constitutive.neural.NeuralLaw`), by that law's hand-written adjoint, in
row chunks on the CPU threads.

:class:`TorchLawStages` holds this code as methods of :class:`~diffworld.sims.mpm.solver.Stepper`
(its base class): they use the stepper's ``model``, ``device``, ``torch_laws`` (the bindings),
``_law_all`` (whether a binding's rows are every particle, in order), ``_law_workers`` (CPU
threads), ``_row_chunks`` and ``_parallel``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch

if TYPE_CHECKING:
    from diffworld.sims.mpm.model import LawBinding, ParticleParams

__all__ = ["MIN_LAW_ROWS_PER_THREAD", "TorchLawStages"]

# Rows per torch thread in a law stage that runs as one chunk (:meth:`TorchLawStages._law_threads`).
MIN_LAW_ROWS_PER_THREAD = 500


class _Staged(NamedTuple):
    """What a torch law's own ``substep_stage`` kept for its ``substep_stage_adjoint`` (an entry
    of the solver's ``_Substep.law_graphs`` in place of an autograd graph): per row chunk [a, b)
    of the binding's rows, what the stage kept for it."""

    bounds: list  # [(a, b), ...]
    saved: list


class TorchLawStages:
    """The torch-law methods of :class:`~diffworld.sims.mpm.solver.Stepper` (see the module
    docstring for what they need of it)."""

    def law_parameters(self) -> list[torch.Tensor]:
        """The parameters of the model's torch laws, binding by binding: a substep takes them
        after the particle parameters (and returns their adjoints there). A rollout calls this
        once at its start; the substeps' adjoints then use the same lists (``law.parameters()``
        walks the law's modules: ~20 us per substep for NCLaw's two networks)."""
        self._own_params = [list(b.law.parameters()) for b in self.torch_laws]
        return [p for own in self._own_params for p in own]

    def _law_own_params(self, j: int) -> list[torch.Tensor]:
        """Binding ``j``'s law parameters as :meth:`law_parameters` last listed them (what the
        substeps' parameter adjoints are laid out by), else as the law has them now."""
        own = getattr(self, "_own_params", None)
        return own[j] if own is not None and j < len(own) else list(self.torch_laws[j].law.parameters())

    @staticmethod
    def _law_inputs(b: LawBinding, pp: ParticleParams) -> dict[str, torch.Tensor]:
        return {name: getattr(pp, name)[b.index] for name in b.law.material_parameters}

    def _torch_laws_forward(self, F: torch.Tensor, pp: ParticleParams, tau_out: torch.Tensor,
                            F_out: torch.Tensor | None = None, step: int | None = None,
                            keep: bool = False) -> list | None:
        """Rows of the torch-law particles: ``tau_out = stress(F)``, or with ``F_out``, the
        substep's stage ``F_out = project(F)``, ``tau_out = stress(F_out)``. The Warp kernels left
        these rows as F and 0 (law code EXTERNAL).

        With ``keep``, the laws run with autograd on and their graphs are returned (one entry per
        binding) for :meth:`_torch_laws_adjoint`: a window's backward then evaluates each law once
        per substep instead of twice (the recomputed forward and the adjoint)."""
        graphs = [] if keep else None
        with torch.set_grad_enabled(keep):
            for j, b in enumerate(self.torch_laws):
                full = self._law_all[j]
                stage = getattr(b.law, "substep_stage", None) if F_out is not None and not b.law.material_parameters \
                    else None
                res = self._staged_forward(stage, F if full else F[b.index], keep) if stage is not None else None
                if res is not None:  # its own adjoint, no autograd (autograd's numbers to round-off)
                    Fn, tau = res[0], res[1]
                    if not self._both_fine(b, Fn, tau):  # one reduction for both; else name the bad one
                        Fn = self._checked(b, "return map (project)", Fn, step)
                        tau = self._checked(b, "stress", tau, step)
                    if full:
                        F_out.copy_(Fn)
                        tau_out.copy_(tau)
                    else:
                        F_out[b.index], tau_out[b.index] = Fn, tau
                    if keep:
                        graphs.append(res[2])
                    continue
                Fi, inputs = F[b.index], self._law_inputs(b, pp)
                if keep:
                    Fi = Fi.detach().requires_grad_()
                    inputs = {n: t.detach().requires_grad_() for n, t in inputs.items()}
                if F_out is None:
                    outs = (self._checked(b, "stress", b.law.stress(Fi, inputs), step),)
                    tau_out[b.index] = outs[0].detach()
                else:
                    Fn, tau = b.law(Fi, inputs)
                    outs = (self._checked(b, "return map (project)", Fn, step), self._checked(b, "stress", tau, step))
                    F_out[b.index], tau_out[b.index] = outs[0].detach(), outs[1].detach()
                if keep:
                    graphs.append((Fi, inputs, outs))
        return graphs

    @contextlib.contextmanager
    def _law_threads(self, bounds: list):
        """Torch's intra-op threads for a law stage in one row chunk on a CPU whose other cores
        the chunk leaves idle: they share the stage's matrix products and GELUs (OpenMP inside
        torch, no GIL hand-offs; measured at 1,000 rows, 2 cores: the MLP forward + backward
        0.84 -> 0.63 ms), one per :data:`MIN_LAW_ROWS_PER_THREAD` rows. Restored afterwards; never
        fewer than torch already has. ``DIFFWORLD_CPU_THREADS=1`` turns it off (``diffworld sweep``
        sets it for its points, which share the machine)."""
        before = torch.get_num_threads()
        want = before
        if len(bounds) == 1 and self.device.type == "cpu":
            rows = bounds[0][1] - bounds[0][0]
            want = min(self._law_workers, max(1, rows // MIN_LAW_ROWS_PER_THREAD))
        if want <= before:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _staged_forward(self, stage, F: torch.Tensor, keep: bool):
        """A law's own ``substep_stage`` over the rows F (n, 3, 3), in row chunks on the CPU
        threads (:meth:`_row_chunks`): ``(F', tau, _Staged or None)``, or None where the law has
        no stage for these rows. Every row's numbers are the unchunked ones (the stage is per
        row), except the MLP's matrix products, whose blocking may round differently."""
        bounds = self._row_chunks(F.shape[0])
        with self._law_threads(bounds):
            parts = self._parallel(lambda w, a, b: stage(self._cut(a, b, F.shape[0])(F), keep),
                                   bounds)  # (kernels, mm release the GIL)
        if any(p is None for p in parts):
            return None
        if len(parts) == 1:
            Fn, tau = parts[0][0], parts[0][1]
        else:
            Fn, tau = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return Fn, tau, (_Staged(bounds, [p[2] for p in parts]) if keep else None)

    def _staged_adjoint(self, law, staged: _Staged, g_F: torch.Tensor, g_tau: torch.Tensor, own: list):
        """Adjoint of :meth:`_staged_forward`: (d loss / dF of the rows, the gradients of ``own``;
        the chunks' weight gradients summed in chunk order, so the result is deterministic for a
        given thread count)."""
        bounds = staged.bounds

        def chunk(w, a, b):
            cut = self._cut(a, b, g_F.shape[0])
            return law.substep_stage_adjoint(staged.saved[w], cut(g_F).contiguous(), cut(g_tau).contiguous(), own)

        with self._law_threads(bounds):
            parts = self._parallel(chunk, bounds)
        if len(parts) == 1:
            return parts[0]
        g_in = torch.cat([p[0] for p in parts])
        g_own = []
        for k in range(len(own)):
            gs = [p[1][k] for p in parts if p[1][k] is not None]
            g_own.append(None if not gs else gs[0] if len(gs) == 1 else torch.stack(gs).sum(0))
        return g_in, g_own

    @staticmethod
    def _both_fine(b: LawBinding, F_new: Any, tau: Any) -> bool:
        """Whether two torch-law outputs both have shape (n, 3, 3) and finite entries (one
        reduction: the sum of both is finite where all entries are)."""
        shape = (int(b.index.numel()), 3, 3)
        return (isinstance(F_new, torch.Tensor) and isinstance(tau, torch.Tensor) and tuple(F_new.shape) == shape
                and tuple(tau.shape) == shape and bool(torch.isfinite(F_new.sum() + tau.sum())))

    def _checked(self, b: LawBinding, what: str, out: Any, step: int | None) -> torch.Tensor:
        """A torch law's output, or a ValueError naming the law, the body, the substep and the
        problem (a wrong shape, non-finite values): a learned law can produce either."""
        n = int(b.index.numel())
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (n, 3, 3) and bool(torch.isfinite(out.sum())):
            # one reduction decides: the sum of the entries is finite where all of them are (else
            # Inf or NaN; a finite sum that overflows only sends the check to the exact test below)
            return out
        body = self.model.body_names[int(self.model.body[b.index[0]])] if n else "?"
        where = (f"{type(b.law).__name__} (body {body!r}" + (f", substep {step}" if step is not None else "")
                 + f"): its {what}")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, 3, 3):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{where} has shape {shape}; expected ({n}, 3, 3), one 3 x 3 matrix per particle")
        bad = ~torch.isfinite(out).reshape(n, 9).all(1)
        if bool(bad.any()):
            raise ValueError(f"{where} is not finite for {int(bad.sum())} of {n} particles (first: particle "
                             f"{int(b.index[bad.nonzero()[0, 0]])})")
        return out

    def _torch_laws_adjoint(self, F: torch.Tensor, pp: ParticleParams, adj_F_out: torch.Tensor | None,
                            adj_tau_out: torch.Tensor, adj_F: torch.Tensor, adj_params: Sequence[torch.Tensor],
                            graphs: list | None = None) -> None:
        """Adjoint of :meth:`_torch_laws_forward` by autograd, on the graphs a ``keep`` forward
        returned (``graphs``, consumed) or else on the recomputed rows: accumulates into
        ``adj_F``, the particle parameters' adjoints and the laws' parameters' adjoints."""
        names = pp._fields  # PARTICLE_PARAMS: the particle parameters lead adj_params
        slot = len(names)
        for j, b in enumerate(self.torch_laws):
            own = self._law_own_params(j)
            if graphs is not None and isinstance(graphs[j], _Staged):
                staged, graphs[j] = graphs[j], None
                full = self._law_all[j]
                g_F = adj_F_out if full else adj_F_out[b.index]
                g_tau = adj_tau_out if full else adj_tau_out[b.index]
                g_in, g_own = self._staged_adjoint(b.law, staged, g_F, g_tau, own)
                if full:
                    adj_F += g_in
                else:
                    adj_F.index_add_(0, b.index, g_in)
                for k, (p, g) in enumerate(zip(own, g_own)):
                    if g is not None and p.requires_grad:
                        adj_params[slot + k].add_(g)
                slot += len(own)
                continue
            with torch.enable_grad():
                gouts = (adj_tau_out[b.index],) if adj_F_out is None else (adj_F_out[b.index], adj_tau_out[b.index])
                if graphs is not None and graphs[j] is not None:
                    (Fi, inputs, outs), graphs[j] = graphs[j], None
                else:
                    Fi = F[b.index].detach().requires_grad_()
                    inputs = {n: t.detach().requires_grad_() for n, t in self._law_inputs(b, pp).items()}
                    outs = (b.law.stress(Fi, inputs),) if adj_F_out is None else b.law(Fi, inputs)
                live = [p for p in own if p.requires_grad]
                grads = torch.autograd.grad(outs, [Fi, *inputs.values(), *live], gouts, allow_unused=True)
            if grads[0] is not None:
                adj_F.index_add_(0, b.index, grads[0])
            for name, g in zip(inputs, grads[1:1 + len(inputs)]):
                if g is not None:
                    adj_params[names.index(name)].index_add_(0, b.index, g)
            g_live = iter(grads[1 + len(inputs):])
            for j, p in enumerate(own):
                g = next(g_live) if p.requires_grad else None
                if g is not None:
                    adj_params[slot + j].add_(g)
            slot += len(own)
