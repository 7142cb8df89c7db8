"""Vision-based tactile sensors (issue 15): elastomer geometry now; contact, markers and the
optical image next.

* :mod:`.sensors`: the hemispherical dome and the flat pad as FEM meshes with their contact
  surface and fixed base.
"""

from diffworld.sims.tactile.sensors import SensorGeometry, dome, flat_pad, prism_tets

__all__ = ["SensorGeometry", "dome", "flat_pad", "prism_tets"]
