"""Vision-based tactile sensors (issue 15): elastomer geometry, camera and markers now;
contact and the optical image next.

* :mod:`.sensors`: the hemispherical dome and the flat pad as FEM meshes with their contact
  surface and fixed base.
* :mod:`.camera`: the sensor camera (pinhole, equidistant fisheye) and markers fixed on the gel.
"""

from diffworld.sims.tactile.camera import Markers, SensorCamera
from diffworld.sims.tactile.sensors import SensorGeometry, dome, flat_pad, prism_tets

__all__ = ["Markers", "SensorCamera", "SensorGeometry", "dome", "flat_pad", "prism_tets"]
