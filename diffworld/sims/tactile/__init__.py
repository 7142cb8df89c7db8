"""Vision-based tactile sensors (issue 15): elastomer geometry, camera, markers and the
optical image now; contact next.

* :mod:`.sensors`: the hemispherical dome and the flat pad as FEM meshes with their contact
  surface and fixed base.
* :mod:`.camera`: the sensor camera (pinhole, equidistant fisheye) and markers fixed on the gel.
* :mod:`.optical`: the RGB tactile image (photometric shading of the deformed contact surface).
* :mod:`.gripper`: a parallel-jaw gripper carrying two flat pads, and the FEM model and control of
  a posed sensor.
"""

from diffworld.sims.tactile.camera import Markers, SensorCamera
from diffworld.sims.tactile.gripper import PadPoses, ParallelGripper, place_mesh, sensor_control, sensor_model
from diffworld.sims.tactile.optical import OpticalImage, Photometric
from diffworld.sims.tactile.sensors import SensorGeometry, dome, flat_pad, prism_tets

__all__ = ["Markers", "OpticalImage", "PadPoses", "ParallelGripper", "Photometric", "SensorCamera", "SensorGeometry",
           "dome", "flat_pad", "place_mesh", "prism_tets", "sensor_control", "sensor_model"]
