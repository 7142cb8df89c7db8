"""Warp kernels of FlexiCubes (one module: one compile, one cache entry), and the surface scan.

The scan finds, from the node signs alone, everything FlexiCubes needs to know about the volume:

* the *surface cubes* (cubes whose 8 corners do not all share a sign), with their raw case
  ``sum([s_c < 0] << c)``, corner ``c = x + 2y + 4z`` (the convention of
  :func:`diffworld.geometry.grid.cube_cases`);
* for each axis, the start nodes of the grid edges whose end values differ in sign (*cut edges*);
* whether a boundary node is inside (the surface would be open there).

Grid layout: node values ``s`` of shape (nx+1, ny+1, nz+1), C order; a node is inside when
``s < 0``. Every node (i, j, k) owns the cube (i, j, k) (when i < nx, j < ny, k < nz) and the
three grid edges that leave it towards +x, +y, +z.

Three passes, no sort, no atomics:

1. *pack* (the only pass over the values): the inside bits of each grid row (i, j, :), 64 nodes
   to a uint64 word, ``bits[i, j, w]`` (1 bit per node: 1/32 of a float32 grid).
2. *count*, one thread per row (i, j): sign changes and surface cubes are word-wide bit
   operations on the row and its +x, +y, +x+y neighbours (a cube is on the surface when the OR of
   its 8 corner bits is 1 and their AND is 0; the k+1 corners are the words shifted by one), and
   ``bit_count`` counts them: 64 cubes per handful of instructions. Counts are (4, rows) int32.
3. exclusive prefix sum of the counts over the rows in row-major order (torch, rows are only
   (nx+1)(ny+1)), then *emit*: rows with a non-zero count visit their set bits lowest first and
   write at their offsets. Rows in row-major order and k ascending within a row: the outputs
   come out sorted exactly like ``torch.nonzero``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import warp as wp

from diffworld.engine.bridge import launch, to_warp
from diffworld.engine.runtime import init_warp

init_warp()
# Integer topology only: nothing here is differentiated.
wp.set_module_options({"enable_backward": False})

__all__ = ["SurfaceScan", "surface_scan", "surface_scan_torch", "warm_up"]


@wp.func
def _inside_byte(s: wp.array(dtype=Any), b: int) -> int:
    """Inside bits of the 8 values s[b:b+8] (bit t = [s[b+t] < 0])."""
    zero = type(s[b])(0.0)
    return (wp.where(s[b] < zero, 1, 0) | wp.where(s[b + 1] < zero, 2, 0) | wp.where(s[b + 2] < zero, 4, 0)
            | wp.where(s[b + 3] < zero, 8, 0) | wp.where(s[b + 4] < zero, 16, 0) | wp.where(s[b + 5] < zero, 32, 0)
            | wp.where(s[b + 6] < zero, 64, 0) | wp.where(s[b + 7] < zero, 128, 0))


@wp.kernel
def pack_signs_kernel(
    s: wp.array(dtype=Any),
    n2: int,
    bits: wp.array3d(dtype=wp.uint64),
):
    """bits[i, j, w] bit t = [s[i, j, 64 w + t] < 0], s flat (C order); bits past the row end are 0.

    The masks of the other kernels rely on the zero padding. Unrolled by 16 (branch-free): the
    plain loop ran at about half the speed on CPU (loop overhead and index arithmetic per value).
    """
    i, j, w = wp.tid()
    k0 = w * 64
    base = (i * bits.shape[1] + j) * n2 + k0
    n = wp.min(64, n2 - k0)
    zero = type(s[base])(0.0)
    word = wp.uint64(0)
    t = int(0)
    while t + 16 <= n:
        half = _inside_byte(s, base + t) | (_inside_byte(s, base + t + 8) << 8)
        word = word | (wp.uint64(half) << wp.uint64(t))
        t = t + 16
    while t < n:
        word = word | (wp.uint64(wp.where(s[base + t] < zero, 1, 0)) << wp.uint64(t))
        t = t + 1
    bits[i, j, w] = word


@wp.func
def _word(bits: wp.array3d(dtype=wp.uint64), i: int, j: int, w: int, ok: int) -> wp.uint64:
    """Word w of row (i, j); 0 past the end of the row or where ``ok`` is 0 (no such row)."""
    if ok != 0 and w < bits.shape[2]:
        return bits[i, j, w]
    return wp.uint64(0)


@wp.func
def _next_k(word: wp.uint64, following: wp.uint64) -> wp.uint64:
    """Bit t = node k+1 of the row (the next word supplies bit 63)."""
    return (word >> wp.uint64(1)) | (following << wp.uint64(63))


@wp.func
def _low_mask(n: int) -> wp.uint64:
    """The min(n, 64) lowest bits set (n >= 0)."""
    if n >= 64:
        return ~wp.uint64(0)
    return (wp.uint64(1) << wp.uint64(n)) - wp.uint64(1)


@wp.kernel
def scan_count_kernel(
    bits: wp.array3d(dtype=wp.uint64),
    n2: int,
    counts: wp.array2d(dtype=wp.int32),
    boundary_inside: wp.array(dtype=wp.int32),
):
    """Per row (i, j): counts[0] surface cubes, counts[1 + a] cut edges along axis a; (4, n0*n1)."""
    i, j = wp.tid()
    n0 = bits.shape[0]
    n1 = bits.shape[1]
    nw = bits.shape[2]
    has_x = int(0)
    has_y = int(0)
    if i < n0 - 1:
        has_x = 1
    if j < n1 - 1:
        has_y = 1
    has_cube = has_x * has_y
    side = int(0)  # the whole row lies on a boundary face
    if i == 0 or i == n0 - 1 or j == 0 or j == n1 - 1:
        side = 1
    nz = n2 - 1
    n_cube = int(0)
    n_x = int(0)
    n_y = int(0)
    n_z = int(0)
    hit = int(0)
    for w in range(nw):
        a = bits[i, j, w]
        b = _word(bits, i + 1, j, w, has_x)
        c = _word(bits, i, j + 1, w, has_y)
        d = _word(bits, i + 1, j + 1, w, has_cube)
        # Bits of the nodes that start a z edge (k < nz); padding bits are 0 in every word, so
        # x/y sign changes need no mask.
        edge_z = _low_mask(nz - w * 64)
        a1 = _next_k(a, _word(bits, i, j, w + 1, 1))
        # Rows on the +x (+y) face own no x (y) edges: their missing neighbour reads as 0 bits.
        n_x = n_x + wp.bit_count(a ^ b) * has_x
        n_y = n_y + wp.bit_count(a ^ c) * has_y
        n_z = n_z + wp.bit_count((a ^ a1) & edge_z)
        if has_cube != 0:
            b1 = _next_k(b, _word(bits, i + 1, j, w + 1, 1))
            c1 = _next_k(c, _word(bits, i, j + 1, w + 1, 1))
            d1 = _next_k(d, _word(bits, i + 1, j + 1, w + 1, 1))
            # A surface cube has some corner inside and not all corners inside.
            any_in = a | b | c | d | a1 | b1 | c1 | d1
            all_in = a & b & c & d & a1 & b1 & c1 & d1
            n_cube = n_cube + wp.bit_count(any_in & ~all_in & edge_z)
        if side != 0:
            if a != wp.uint64(0):
                hit = 1
        else:
            # Only the first (k = 0) and last (k = nz) nodes of an interior row are on the boundary.
            if w == 0 and (a & wp.uint64(1)) != wp.uint64(0):
                hit = 1
            if w == nw - 1 and ((a >> wp.uint64(nz - w * 64)) & wp.uint64(1)) != wp.uint64(0):
                hit = 1
    row = i * n1 + j
    counts[0, row] = n_cube
    counts[1, row] = n_x
    counts[2, row] = n_y
    counts[3, row] = n_z
    if hit != 0:
        # Every writer stores the same value: a benign race, no atomic needed.
        boundary_inside[0] = 1


@wp.func
def _lowest_bit(m: wp.uint64) -> int:
    """Index of the lowest set bit of a non-zero word."""
    return wp.bit_count((m & (~m + wp.uint64(1))) - wp.uint64(1))


@wp.func
def _bit(m: wp.uint64, t: int, shift: int) -> int:
    return int((m >> wp.uint64(t)) & wp.uint64(1)) << shift


@wp.func
def _write_ijk(out: wp.array2d(dtype=wp.int64), row: int, i: int, j: int, k: int):
    out[row, 0] = wp.int64(i)
    out[row, 1] = wp.int64(j)
    out[row, 2] = wp.int64(k)


@wp.kernel
def scan_emit_kernel(
    bits: wp.array3d(dtype=wp.uint64),
    n2: int,
    counts: wp.array2d(dtype=wp.int32),
    first: wp.array2d(dtype=wp.int32),
    cubes: wp.array2d(dtype=wp.int64),
    cube_case: wp.array(dtype=wp.uint8),
    cut_x: wp.array2d(dtype=wp.int64),
    cut_y: wp.array2d(dtype=wp.int64),
    cut_z: wp.array2d(dtype=wp.int64),
):
    """Write each row's surface cubes (with cases) and cut-edge start nodes at its offsets.

    Same words and masks as :func:`scan_count_kernel`; set bits are visited lowest first, so k
    ascends within a row and the outputs come out in row-major order.
    """
    i, j = wp.tid()
    n0 = bits.shape[0]
    n1 = bits.shape[1]
    nw = bits.shape[2]
    row = i * n1 + j
    if counts[0, row] + counts[1, row] + counts[2, row] + counts[3, row] == 0:
        return  # no surface on this row: the common case
    has_x = int(0)
    has_y = int(0)
    if i < n0 - 1:
        has_x = 1
    if j < n1 - 1:
        has_y = 1
    has_cube = has_x * has_y
    nz = n2 - 1
    m = first[0, row]
    ex = first[1, row]
    ey = first[2, row]
    ez = first[3, row]
    for w in range(nw):
        a = bits[i, j, w]
        b = _word(bits, i + 1, j, w, has_x)
        c = _word(bits, i, j + 1, w, has_y)
        d = _word(bits, i + 1, j + 1, w, has_cube)
        edge_z = _low_mask(nz - w * 64)
        a1 = _next_k(a, _word(bits, i, j, w + 1, 1))
        k0 = w * 64
        if has_cube != 0:
            b1 = _next_k(b, _word(bits, i + 1, j, w + 1, 1))
            c1 = _next_k(c, _word(bits, i, j + 1, w + 1, 1))
            d1 = _next_k(d, _word(bits, i + 1, j + 1, w + 1, 1))
            any_in = a | b | c | d | a1 | b1 | c1 | d1
            all_in = a & b & c & d & a1 & b1 & c1 & d1
            surf = any_in & ~all_in & edge_z
            while surf != wp.uint64(0):
                t = _lowest_bit(surf)
                _write_ijk(cubes, m, i, j, k0 + t)
                # Corner c = x + 2y + 4z: (i, j, k), (i+1, j, k), (i, j+1, k), (i+1, j+1, k), then k+1.
                code = (_bit(a, t, 0) | _bit(b, t, 1) | _bit(c, t, 2) | _bit(d, t, 3) | _bit(a1, t, 4)
                        | _bit(b1, t, 5) | _bit(c1, t, 6) | _bit(d1, t, 7))
                cube_case[m] = wp.uint8(code)
                m = m + 1
                surf = surf & (surf - wp.uint64(1))
        cx = wp.uint64(0)
        cy = wp.uint64(0)
        if has_x != 0:
            cx = a ^ b
        if has_y != 0:
            cy = a ^ c
        while cx != wp.uint64(0):
            _write_ijk(cut_x, ex, i, j, k0 + _lowest_bit(cx))
            ex = ex + 1
            cx = cx & (cx - wp.uint64(1))
        while cy != wp.uint64(0):
            _write_ijk(cut_y, ey, i, j, k0 + _lowest_bit(cy))
            ey = ey + 1
            cy = cy & (cy - wp.uint64(1))
        cz = (a ^ a1) & edge_z
        while cz != wp.uint64(0):
            _write_ijk(cut_z, ez, i, j, k0 + _lowest_bit(cz))
            ez = ez + 1
            cz = cz & (cz - wp.uint64(1))


for _T in (wp.float32, wp.float64):
    wp.overload(pack_signs_kernel, {"s": wp.array(dtype=_T)})


class SurfaceScan(NamedTuple):
    """Result of :func:`surface_scan` (all on the device of the node values).

    Attributes:
        cubes: (M, 3) int64 surface cubes (i, j, k), sorted by linear id ``(i*ny + j)*nz + k``
            (the order of ``torch.nonzero`` over the (nx, ny, nz) cube grid).
        case: (M,) uint8 raw case of each surface cube: bit ``c`` set when corner
            ``c = x + 2y + 4z`` has a negative value; never 0 or 255.
        cut_starts: 3 tensors (Q_a, 3) int64, for a = x, y, z: the start nodes of the grid edges
            along ``a`` whose two end values differ in sign (one inside, one not), sorted
            row-major (the order of ``torch.nonzero``).
    """

    cubes: torch.Tensor
    case: torch.Tensor
    cut_starts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_values(sdf: Any, name: str) -> None:
    # Cheap checks only (no pass over the values): callers validate finiteness where they need it
    # (NaN reads as outside, exactly like ``sdf < 0`` in the torch path).
    if not isinstance(sdf, torch.Tensor):
        raise TypeError(f"Expected '{name}' to be a torch.Tensor, got {type(sdf).__name__}")
    if sdf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Expected '{name}' of dtype float32 or float64, got {sdf.dtype}")
    if sdf.dim() != 3 or min(sdf.shape) < 2:
        raise ValueError(f"Expected '{name}' of shape (nx+1, ny+1, nz+1) with every n >= 1, got {tuple(sdf.shape)}")


def _raise_open_boundary(sdf: torch.Tensor, name: str) -> None:
    from diffworld.geometry.grid import check_closed_boundary

    # Only reached when the kernel found a violation: the torch check then raises its own message
    # (one source for the text); the dense mask costs nothing on the error path.
    check_closed_boundary(sdf < 0, name)
    raise RuntimeError("surface scan: kernel reported a boundary node inside, torch check did not (internal error)")


def surface_scan(sdf: torch.Tensor, *, check_boundary: bool = True, name: str = "sdf") -> SurfaceScan:
    """Surface cubes, their cases and the cut grid edges of node values, with Warp kernels.

    Same outputs, bit for bit, as the torch path (:func:`surface_scan_torch`): ``inside = sdf < 0``,
    :func:`~diffworld.geometry.grid.check_closed_boundary`, :func:`~diffworld.geometry.grid.cube_cases`,
    ``torch.nonzero`` of the surface cubes and of the sign changes along each axis. The values are
    read once; the rest works on 1 bit per node and on the surface. Scratch memory: the bits
    (1/8 byte per node) and 32 bytes per grid row; no dense mask, case or index volume.

    Runs on the device of ``sdf`` (CPU or CUDA; on CUDA on torch's current stream). One host
    synchronization (to size the outputs). Not differentiable (integer topology).

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), float32 or float64, negative inside; every n >= 1.
            Not checked for finiteness (NaN reads as outside, like ``sdf < 0``).
        check_boundary: Raise when a boundary node is inside (as ``check_closed_boundary``).
        name: Argument named in error messages.

    Returns:
        :class:`SurfaceScan`. Empty outputs are (0, 3) int64 / (0,) uint8 tensors.

    Raises:
        TypeError: ``sdf`` is not a float32/float64 tensor.
        ValueError: Bad shape; with ``check_boundary``, a boundary node inside (the message of
            :func:`~diffworld.geometry.grid.check_closed_boundary`).
    """
    _check_values(sdf, name)
    s = sdf.detach().contiguous()
    dev = s.device
    n0, n1, n2 = (int(n) for n in s.shape)
    # Offsets and indices in the kernels are int32; every count is below the node count.
    if n0 * n1 * n2 >= 2**31:
        raise ValueError(f"'{name}': grid of {n0 * n1 * n2} nodes is too large for int32 indexing")
    n_words = (n2 + 63) // 64
    bits = torch.empty((n0, n1, n_words), dtype=torch.int64, device=dev)  # viewed as uint64
    counts = torch.empty((4, n0 * n1), dtype=torch.int32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    wp_bits = to_warp(bits, dtype=wp.uint64)
    # On CUDA, ``launch`` runs on torch's current stream: ordered with the torch ops around it.
    launch(pack_signs_kernel, (n0, n1, n_words), [to_warp(s.view(-1)), n2, wp_bits], dev)
    launch(scan_count_kernel, (n0, n1), [wp_bits, n2, to_warp(counts), to_warp(flag)], dev)
    inclusive = torch.cumsum(counts, 1, dtype=torch.int64)
    # One readback for the four totals and the boundary flag.
    head = torch.cat([inclusive[:, -1], flag.to(torch.int64)]).tolist()
    totals, hit = head[:4], head[4]
    if check_boundary and hit:
        _raise_open_boundary(s, name)
    cubes = torch.empty((totals[0], 3), dtype=torch.int64, device=dev)
    case = torch.empty(totals[0], dtype=torch.uint8, device=dev)
    cuts = tuple(torch.empty((q, 3), dtype=torch.int64, device=dev) for q in totals[1:])
    if any(totals):
        first = (inclusive - counts).to(torch.int32)
        launch(scan_emit_kernel, (n0, n1),
               [wp_bits, n2, to_warp(counts), to_warp(first), to_warp(cubes), to_warp(case),
                *(to_warp(c) for c in cuts)], dev)
    return SurfaceScan(cubes, case, cuts)


def surface_scan_torch(sdf: torch.Tensor, *, check_boundary: bool = True, name: str = "sdf") -> SurfaceScan:
    """The torch reference of :func:`surface_scan` (dense passes over the volume; tests, benchmarks).

    Args:
        sdf: Node values (nx+1, ny+1, nz+1), float32 or float64, negative inside.
        check_boundary: Raise when a boundary node is inside.
        name: Argument named in error messages.

    Returns:
        :class:`SurfaceScan`.
    """
    from diffworld.geometry.grid import check_closed_boundary, cube_cases

    _check_values(sdf, name)
    inside = sdf.detach() < 0
    if check_boundary:
        check_closed_boundary(inside, name)
    case = cube_cases(inside)
    surf = (case > 0) & (case < 255)
    cubes = torch.nonzero(surf)
    cuts = []
    for a in range(3):
        n0 = inside.narrow(a, 0, inside.shape[a] - 1)
        n1 = inside.narrow(a, 1, inside.shape[a] - 1)
        cuts.append(torch.nonzero(n0 != n1))
    return SurfaceScan(cubes, case[surf], tuple(cuts))


def warm_up(device: torch.device | str = "cpu") -> None:
    """Load (or compile) both kernels in float32 and float64 on ``device`` (benchmarks, start-up)."""
    for dtype in (torch.float32, torch.float64):
        s = torch.ones((3, 3, 3), dtype=dtype, device=device)
        s[1, 1, 1] = -1.0  # one surface: the emit kernel runs too
        surface_scan(s)
