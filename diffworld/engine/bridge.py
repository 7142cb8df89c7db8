"""The torch <-> Warp bridge (docs/architecture.md, contract 2).

Public API speaks torch; Warp arrays live only inside ops. Tensors are wrapped zero-copy with
``wp.from_torch``. A differentiable op is one ``torch.autograd.Function`` whose forward launches
kernels and whose backward launches their adjoints; the op owns its gradient buffers (Warp never
accumulates into a torch leaf's ``.grad``).

Two ways to write the backward are supported:

* hand-written adjoint kernels (fast; used by marching cubes), launched with :func:`launch`;
* :class:`TapeFunction`: record the forward on a ``wp.Tape`` and replay it backwards. The tape
  re-reads the *current* contents of recorded arrays, so a forward must never overwrite an array
  a recorded kernel read (contract 3).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import struct
import threading
from typing import Any, Callable, Iterator, Sequence

import torch

from diffworld.engine.runtime import init_warp, warp_device

__all__ = [
    "TapeFunction",
    "arg_view",
    "cached_view",
    "check_tensor",
    "launch",
    "on_torch_stream",
    "scalar_type",
    "strided_arg_view",
    "tape_apply",
    "to_warp",
    "torch_stream",
    "vec3_type",
]

# Warp stream objects wrapping torch's CUDA streams, by (device index, raw handle): creating one
# per launch would cost more than many of the launches themselves.
_STREAMS: dict[tuple[int, int], Any] = {}


def scalar_type(dtype: torch.dtype):
    """Warp scalar type for a torch float dtype."""
    wp = init_warp()
    if dtype == torch.float32:
        return wp.float32
    if dtype == torch.float64:
        return wp.float64
    raise TypeError(f"expected a float32 or float64 tensor, got dtype {dtype}")


def vec3_type(dtype: torch.dtype):
    """Warp 3-vector type for a torch float dtype."""
    wp = init_warp()
    return wp.vec3d if dtype == torch.float64 else wp.vec3f


def to_warp(t: torch.Tensor, dtype: Any = None, requires_grad: bool = False):
    """Wrap a contiguous torch tensor as a Warp array without copying.

    Args:
        t: Tensor; made contiguous first if it is not (that copy is then what is wrapped).
        dtype: Warp dtype to view it as (e.g. ``wp.vec3f`` for an (N, 3) float tensor).
        requires_grad: Whether Warp should allocate an adjoint for it (tape ops only).

    Returns:
        A ``wp.array`` that shares memory with ``t``.
    """
    wp = init_warp()
    if not t.is_contiguous():
        t = t.contiguous()
    return wp.from_torch(t, dtype=dtype, requires_grad=requires_grad)


_VIEWS: dict[tuple, Any] = {}


def cached_view(t: torch.Tensor, dtype: Any, shape: tuple[int, ...]):
    """A Warp array viewing the contiguous tensor ``t`` as ``shape`` elements of ``dtype``, cached
    by address, shape, type and device: wrapping a tensor (``wp.from_torch``, ~40 us) costs more
    than a small kernel, and torch's allocator hands the same addresses out again and again.

    The cache only holds views (no memory), so a stale entry is harmless: an address reused by
    another tensor of the same shape and type is viewed the same way.
    """
    def make():
        dev = "cpu" if t.device.type == "cpu" else f"cuda:{t.device.index or 0}"
        return init_warp().array(ptr=t.data_ptr(), dtype=dtype, shape=tuple(shape), device=dev)

    return _cached(_VIEWS, (t.data_ptr(), tuple(shape), dtype, t.dtype, t.device), t, "cached_view", make)


def _cached(store: dict, key: tuple, t: torch.Tensor, who: str, make: Callable[[], Any]) -> Any:
    """``store[key]``, made by ``make()`` on a miss for the contiguous tensor ``t`` (else a
    ValueError naming ``who``); the store is emptied past 4096 entries."""
    if not t.is_contiguous():  # (also on a hit: a transposed view shares address and shape)
        raise ValueError(f"{who}: expected a contiguous tensor")
    a = store.get(key)
    if a is None:
        if len(store) > 4096:
            store.clear()
        a = store[key] = make()
    return a


def torch_stream(device: torch.device | str):
    """The Warp stream of torch's current CUDA stream on ``device``; None on the CPU.

    Launching there orders Warp's work with the torch ops around it, also inside a
    ``torch.cuda.stream(...)`` block (Warp's own per-device stream would race with it).
    """
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type != "cuda":
        return None
    wp = init_warp()
    current = torch.cuda.current_stream(dev)
    key = (current.device_index, current.cuda_stream)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = wp.stream_from_torch(current)
    return stream


@contextlib.contextmanager
def on_torch_stream(device: torch.device | str) -> Iterator[None]:
    """Run the Warp calls of the block that are not :func:`launch` (mesh builds, copies) on torch's
    current CUDA stream of ``device``; nothing changes on the CPU."""
    stream = torch_stream(device)
    if stream is None:
        yield
        return
    wp = init_warp()
    with wp.ScopedStream(stream):
        yield


_ARGS: dict[tuple, Any] = {}
_LAYOUTS: dict[tuple, tuple] = {}
_ARRAY_T: list = []


def _array_t() -> type:
    """Warp's array descriptor type (``array_t(data, grad, ndim, shape, strides)``), taken from
    what its public ``from_torch(..., return_ctype=True)`` returns (the class is not exported)."""
    if not _ARRAY_T:
        _ARRAY_T.append(type(init_warp().from_torch(torch.zeros(1), return_ctype=True)))
    return _ARRAY_T[0]


def _layout(dtype: Any, shape: tuple[int, ...]) -> tuple[torch.dtype, int, tuple[int, ...]]:
    """(torch dtype of the scalars, scalars per element, byte strides) of a contiguous Warp array
    of ``shape`` elements of ``dtype``."""
    lay = _LAYOUTS.get((dtype, shape))
    if lay is None:
        wp = init_warp()
        scalar = getattr(dtype, "_wp_scalar_type_", dtype)
        size = wp.types.type_size_in_bytes(dtype)
        strides, stride = [], size
        for d in reversed(shape):
            strides.append(stride)
            stride *= d
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        lay = _LAYOUTS[(dtype, shape)] = (wp.dtype_to_torch(scalar), size // wp.types.type_size_in_bytes(scalar),
                                          tuple(reversed(strides)))
    return lay


def arg_view(t: torch.Tensor, dtype: Any, shape: tuple[int, ...]):
    """The contiguous tensor ``t`` as a kernel argument: a Warp array descriptor (``array_t``, what
    a launch packs a ``wp.array`` into) of ``shape`` elements of ``dtype``, cached like
    :func:`cached_view`.

    ``t``'s leading dimensions must be ``shape`` and the rest must hold one element of ``dtype``
    (e.g. (n, 3, 3) float32 as ``wp.mat33`` with shape (n,)), in ``dtype``'s scalar type.

    Passing a descriptor (to :func:`launch` or ``wp.launch``) skips the packing, and it is cheaper
    to create than an array: it is built here from the tensor's address (~1 us; ``wp.from_torch(...,
    return_ctype=True)`` costs several and keeps the tensor alive from the cache). It holds no
    reference to ``t``: keep ``t`` alive until the launch has run. It can only be launched on (no
    ``.numpy()``, no copies): use :func:`cached_view` for anything else.
    """
    # (CPU and CUDA addresses are different spaces; the hit path is kept short: ~100 look-ups
    # per MPM substep)
    key = (t.data_ptr(), shape, dtype, t.dtype, t.is_cuda)
    a = _ARGS.get(key)
    if a is None or not t.is_contiguous():  # (a transposed view shares address and shape)
        a = _new_arg_view(t, dtype, shape, key)
    return a


def _new_arg_view(t: torch.Tensor, dtype: Any, shape: tuple[int, ...], key: tuple):
    """:func:`arg_view`'s descriptor for ``t``, checked and cached under ``key``.

    A miss is the common case in a rollout (every substep's new tensors have new addresses), so
    the checks and the descriptor's fields are kept per layout (what they depend on: the Warp type
    and shape, the tensor's dtype and shape), and a miss only copies that layout's template and
    sets the address (~1 us, against ~4 us for the checks and a fresh ``array_t``)."""
    if not t.is_contiguous():
        raise ValueError("arg_view: expected a contiguous tensor")
    lay = (dtype, shape, t.dtype, t.shape)
    template = _TEMPLATES.get(lay)
    if template is None:
        torch_dtype, per_element, strides = _layout(dtype, shape)
        if t.dtype != torch_dtype:
            raise ValueError(f"arg_view: a {t.dtype} tensor cannot be viewed as {dtype.__name__} "
                             f"(its scalars are {torch_dtype})")
        k = len(shape)
        if tuple(t.shape[:k]) != tuple(shape) or math.prod(t.shape[k:]) != per_element:
            raise ValueError(f"arg_view: a tensor of shape {tuple(t.shape)} viewed as {dtype.__name__} does not "
                             f"have shape {tuple(shape)} (expected {tuple(shape)} followed by dimensions of "
                             f"{per_element} scalars in all)")
        if len(_TEMPLATES) > 4096:
            _TEMPLATES.clear()
        template = _TEMPLATES[lay] = _array_t()(0, 0, k, shape, strides)
    return _store(key, template, t.data_ptr())


def _store(key: tuple, template: Any, address: int) -> Any:
    """A copy of the descriptor ``template`` at ``address``, cached in :data:`_ARGS` under ``key``."""
    a = type(template).from_buffer_copy(template)
    a.data = address
    if len(_ARGS) > 4096:
        _ARGS.clear()
    _ARGS[key] = a
    return a


_TEMPLATES: dict[tuple, Any] = {}  # descriptors at address 0 by layout (see _new_arg_view)


def strided_arg_view(t: torch.Tensor, dtype: Any):
    """The tensor ``t`` of ``dtype``'s scalars (a Warp scalar type: ``wp.float32``, ...) as a
    kernel argument of ``t``'s shape and ``t``'s strides, whatever they are: a transposed or a
    column-sliced matrix is read in place (a kernel indexes ``a[i, j]`` through the strides), with
    no copy. For inputs: a tensor whose elements overlap (zero strides) must not be written.

    Cached and built like :func:`arg_view` (no reference to ``t`` is kept)."""
    key = (t.data_ptr(), t.shape, t.stride(), dtype, t.dtype, t.is_cuda)
    a = _ARGS.get(key)
    if a is None:
        torch_dtype, per_element, _ = _layout(dtype, ())
        if per_element != 1:
            raise ValueError(f"strided_arg_view: expected a Warp scalar type (wp.float32, ...), got {dtype.__name__}")
        if t.dtype != torch_dtype:
            raise ValueError(f"strided_arg_view: expected a tensor of {dtype.__name__} scalars ({torch_dtype}), "
                             f"got {t.dtype}")
        if not 1 <= t.dim() <= 4:
            raise ValueError(f"strided_arg_view: expected 1 to 4 dimensions, got shape {tuple(t.shape)}")
        size = t.element_size()
        template = _array_t()(0, 0, t.dim(), tuple(t.shape), tuple(s * size for s in t.stride()))
        a = _store(key, template, t.data_ptr())
    return a


# Recorded CPU launches (``wp.launch(..., record_cmd=True)``) by (kernel, dim, adjoint, thread):
# replaying one and setting only the arguments that changed costs a fraction of ``wp.launch``,
# which packs every argument again (~1.5 us each; 10-20 arguments per MPM kernel). Per thread,
# because a recorded launch holds its arguments and the MPM runs particle chunks concurrently.
_RECORDED: dict[tuple, Any] = {}
_RECORDED_MAX = 1024


class _DirectCall:
    """A recorded CPU launch's argument structures, kept between replays and passed straight to
    the compiled kernel: ``Launch.launch`` builds them again from every argument at each call
    (~7 us for an MPM kernel's 18 arguments, against ~0.3 us for the call itself). Only the
    fields of the arguments that changed are set: array descriptors straight into their field
    (:meth:`put`), other values packed by ``Launch.set_param_at_index`` first (:meth:`copy`). The
    record's own ``params`` then go stale: a record with a direct call is only ever replayed
    through it (a graph capture does not replay, see :func:`launch`).

    Built from Warp's own structure types (``kernel._invoke_cache``, what ``Launch.launch`` fills);
    :meth:`of` returns None where this Warp version lays them out otherwise, or for a launch that
    ``Launch.launch`` would send elsewhere (tiled CPU kernels), and the replay then calls
    ``Launch.launch``."""

    __slots__ = ("fn", "refs", "slots", "n_fwd", "cmd")

    @classmethod
    def of(cls, cmd) -> "_DirectCall | None":
        try:
            from warp._src.context import _build_cpu_args_structs

            if getattr(cmd, "block_dim", 1) > 1 or not cmd.device.is_cpu:
                return None
            args, adj_args = _build_cpu_args_structs(cmd.kernel, cmd.hooks, cmd.params, cmd.adjoint)
            n_fwd = len(cmd.kernel.adj.args)
            structs = (args,) if adj_args is None else (args, adj_args)
            slots = [[(st, name) for name, _ in type(st)._fields_] for st in structs]
            if sum(map(len, slots)) != len(cmd.params) - 1 or len(slots[0]) != n_fwd:
                return None
            self = cls()
            self.fn = cmd.hooks.backward if cmd.adjoint else cmd.hooks.forward
            self.refs = (ctypes.byref(cmd.bounds), *(ctypes.byref(st) for st in structs))
            self.slots = slots if adj_args is not None else [slots[0], []]
            self.n_fwd, self.cmd = n_fwd, cmd
            return self
        except Exception:  # (another Warp layout: the replay falls back to Launch.launch)
            return None

    def put(self, index: int, adjoint: bool, descriptor: ctypes.Structure) -> None:
        """Set array argument ``index`` (of the adjoint half with ``adjoint``) to ``descriptor``."""
        st, name = self.slots[adjoint][index]
        setattr(st, name, descriptor)

    def copy(self, index: int, adjoint: bool) -> None:
        """Copy argument ``index`` from the recorded launch, where ``set_param_at_index`` has just
        packed it (with its type check), into the kept structure."""
        st, name = self.slots[adjoint][index]
        setattr(st, name, self.cmd.params[1 + index + (self.n_fwd if adjoint else 0)])


def _capturing() -> bool:
    """Whether a Warp graph capture is recording: launches then go through ``wp.launch``, which
    records them (a replayed launch would run outside the capture)."""
    if not _WARP_CONTEXT:
        try:
            import warp._src.context as context
        except ImportError:  # (another Warp layout: replays go through Launch.launch, which records)
            context = None
        _WARP_CONTEXT.append(context)
    ctx = _WARP_CONTEXT[0]
    return ctx is not None and getattr(ctx.runtime, "_apic_capture", None) is not None


_WARP_CONTEXT: list = []  # Warp's context module (None: not found), looked up once


_AGAIN = object()  # stands for an argument that is set again at every replay


def _kept(v: Any) -> Any:
    """What a recorded launch remembers of argument ``v`` to skip setting it again when an equal
    one comes back (:func:`_same`): array descriptors (:func:`arg_view`; they own no memory) by
    identity; numbers, Warp scalars and Warp vectors and matrices by type and exact value (their
    bytes, so -0.0 is not 0.0; a vector changed in place is a changed value). Anything else
    (``wp.array``, which may own memory the record must not keep alive; structs) is set at every
    replay."""
    if v is None:
        return None
    t = type(v)
    kind = _KINDS.get(t)
    if kind is None:
        kind = _KINDS[t] = _kind(t)
    if kind == _DESCRIPTOR:
        return v
    if kind == _INT:
        return (t, v)
    if kind == _FLOAT:
        return (t, _F64.pack(v))
    if kind == _VECTOR:
        return (t, bytes(v))
    if kind == _WARP_SCALAR:
        return (t, repr(v.value))
    return _AGAIN


def _same(memo: Any, prev: Any) -> bool:
    """Whether a :func:`_kept` memo equals the recorded one (descriptors: the same object)."""
    return memo is prev or (type(memo) is tuple and memo == prev)


_DESCRIPTOR, _INT, _FLOAT, _VECTOR, _WARP_SCALAR, _OTHER = range(6)
_KINDS: dict[type, int] = {}
_F64 = struct.Struct("<d")


def _kind(t: type) -> int:
    """How :func:`_kept` remembers a value of type ``t``."""
    if issubclass(t, ctypes.Structure):
        return _DESCRIPTOR
    if t is int or t is bool:
        return _INT
    if t is float:
        return _FLOAT
    if issubclass(t, ctypes.Array):  # wp.vec*, wp.mat*
        return _VECTOR
    # Warp's scalar types (wp.float32(x) etc.) share a base class that is not exported
    if issubclass(t, type(init_warp().float32(0.0)).__mro__[-2]):
        return _WARP_SCALAR
    return _OTHER


def launch(kernel, dim: int | Sequence[int], inputs: Sequence[Any], device: torch.device | str,
           outputs: Sequence[Any] = (), adjoint: bool = False, adj_inputs=None, adj_outputs=None,
           replay: bool = False) -> None:
    """Launch a Warp kernel on the torch device ``device``; a zero-size launch is skipped.

    On CUDA the kernel runs on torch's current stream (:func:`torch_stream`).

    ``replay`` (CPU; for hot loops of many small launches, such as the MPM substep): the launch is
    recorded once per kernel, size and thread and replayed, with only the changed arguments set
    (Warp's ``Launch`` API); the first launch of each goes through ``wp.launch``, which checks
    every argument's type, and later ones check those that are not array descriptors
    (:func:`arg_view`) as they are set. Only for concrete kernels (not generic ones, whose
    overload ``wp.launch`` picks by the argument types) and outside a ``wp.Tape`` (a replay is not
    recorded on it).
    """
    wp = init_warp()
    if (isinstance(dim, int) and dim == 0) or (not isinstance(dim, int) and 0 in tuple(dim)):
        return
    stream = torch_stream(device)
    fwd = [*inputs, *outputs]
    adj = [*(adj_inputs or []), *(adj_outputs or [])] if adjoint else []
    if stream is None and replay and _capturing():
        replay = False  # (a graph capture records launches made through wp.launch)
    if stream is None and replay:
        key = (kernel, dim if isinstance(dim, int) else tuple(dim), adjoint, threading.get_ident())
        rec = _RECORDED.get(key)
        if rec is not None and len(fwd) == len(rec[1]) and len(adj) == len(rec[2]):
            cmd, last, last_adj, direct = rec
            for values, prev, is_adj in ((fwd, last, False), (adj, last_adj, True)):
                for i, v in enumerate(values):
                    if v is prev[i]:  # (a descriptor or None again)
                        continue
                    if isinstance(v, ctypes.Structure):  # an array descriptor (arg_view)
                        if direct is not None:
                            direct.put(i, is_adj, v)
                        else:
                            cmd.set_param_at_index_from_ctype(i, v, adjoint=is_adj)
                        prev[i] = v
                        continue
                    memo = _kept(v)
                    if memo is not _AGAIN and _same(memo, prev[i]):
                        continue
                    cmd.set_param_at_index(i, v, adjoint=is_adj)
                    if direct is not None:
                        direct.copy(i, is_adj)
                    prev[i] = memo
            if direct is not None:
                direct.fn(*direct.refs)
            else:
                cmd.launch()
            return
    kwargs: dict[str, Any] = {}
    if adjoint:
        kwargs = dict(adjoint=True, adj_inputs=list(adj_inputs or []), adj_outputs=list(adj_outputs or []))
    if stream is not None:
        kwargs["stream"] = stream
        wp.launch(kernel, dim=dim, inputs=list(inputs), outputs=list(outputs), device=warp_device(device), **kwargs)
        return
    if not replay:
        wp.launch(kernel, dim=dim, inputs=list(inputs), outputs=list(outputs), device=warp_device(device), **kwargs)
        return
    cmd = wp.launch(kernel, dim=dim, inputs=list(inputs), outputs=list(outputs), device=warp_device(device),
                    record_cmd=True, **kwargs)
    # the record keeps no argument alive: Warp's copies of them (for CPU graph capture, not used
    # here) are dropped, and only what _kept allows is remembered
    cmd.fwd_args = cmd.adj_args = None
    if len(_RECORDED) >= _RECORDED_MAX:
        _RECORDED.clear()
    _RECORDED[key] = (cmd, [_kept(v) for v in fwd], [_kept(v) for v in adj], _DirectCall.of(cmd))
    cmd.launch()


def check_tensor(name: str, t: Any, *, ndim: int | None = None, shape: Sequence[int | None] | None = None,
                 floating: bool = True, finite: bool = True) -> torch.Tensor:
    """Validate a user tensor at the Python boundary, with a message naming the argument.

    Args:
        name: Argument name used in the error message.
        t: The value to check.
        ndim: Required number of dimensions.
        shape: Required shape; ``None`` entries match any size.
        floating: Require float32 or float64.
        finite: Reject NaN and Inf.

    Returns:
        ``t`` unchanged.

    Raises:
        TypeError: Not a tensor, or wrong dtype.
        ValueError: Wrong shape or non-finite values.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Expected '{name}' to be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Expected '{name}' of dtype float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"Expected '{name}' with {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"Expected '{name}' of shape {want}, got {tuple(t.shape)}")
    if finite and floating and t.numel():
        # NaN and +-Inf always reach the min or max: two reductions instead of a full mask.
        lo, hi = torch.aminmax(t.detach())
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"'{name}' contains {bad} non-finite value(s) (NaN or Inf)")
    return t


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_faces(name: str, faces: Any, n_vertices: int, vertices_name: str = "vertices") -> torch.Tensor:
    """Validate triangle (or any fixed-arity) vertex indices at the Python boundary.

    Args:
        name: Argument name used in the error message.
        faces: Integer tensor, shape (F, 3).
        n_vertices: Rows of the vertex array the indices point into.
        vertices_name: Its argument name, for the message.

    Returns:
        ``faces`` as int64 (a copy only when it was another integer type).

    Raises:
        TypeError: Not a tensor, or not an integer dtype.
        ValueError: Wrong shape, or an index outside ``[0, n_vertices)``.
    """
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"Expected '{name}' to be a torch.Tensor, got {type(faces).__name__}")
    if faces.dtype not in _INT_DTYPES:
        raise TypeError(f"Expected '{name}' of an integer dtype (int64 preferred), got {faces.dtype}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"Expected '{name}' of shape (*, 3), got {tuple(faces.shape)}")
    faces = faces.long()
    if faces.numel():
        lo, hi = torch.aminmax(faces)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n_vertices:
            raise ValueError(f"'{name}' indices must lie in [0, {n_vertices}) for {n_vertices} vertices "
                             f"('{vertices_name}'), got indices in [{lo}, {hi}]")
    return faces


class TapeFunction(torch.autograd.Function):
    """Generic differentiable op around a Warp tape.

    ``forward_fn(wp_inputs) -> list of wp output arrays`` launches kernels on Warp arrays wrapped
    around *copies* of the inputs (so the tape's re-reads see the values of this call even if the
    caller mutates its tensors later). Backward seeds the output adjoints with the incoming
    gradients, replays the tape and clones the input adjoints out; the tape is then released.

    Use through :func:`tape_apply`.
    """

    @staticmethod
    def forward(ctx, forward_fn: Callable, n_inputs: int, *tensors: torch.Tensor):
        wp = init_warp()
        inputs = [t.detach().clone().contiguous() for t in tensors[:n_inputs]]
        wp_inputs = [wp.from_torch(t, requires_grad=True) for t in inputs]
        tape = wp.Tape()
        with tape:
            wp_outputs = forward_fn(wp_inputs)
        ctx.tape, ctx.wp_inputs, ctx.wp_outputs = tape, wp_inputs, wp_outputs
        # Outputs are cloned out so later writes by the caller cannot corrupt the tape.
        return tuple(wp.to_torch(o).clone() for o in wp_outputs)

    @staticmethod
    def backward(ctx, *grads):
        wp = init_warp()
        tape = ctx.tape
        for out, g in zip(ctx.wp_outputs, grads):
            if g is not None:
                wp.to_torch(out.grad).copy_(g.reshape(wp.to_torch(out.grad).shape))
        tape.backward()
        in_grads = tuple(wp.to_torch(a.grad).clone() for a in ctx.wp_inputs)
        tape.reset()
        ctx.tape = ctx.wp_inputs = ctx.wp_outputs = None
        return (None, None) + in_grads


def tape_apply(forward_fn: Callable, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``forward_fn`` on Warp views of ``tensors`` under a tape; differentiable in torch."""
    return TapeFunction.apply(forward_fn, len(tensors), *tensors)


