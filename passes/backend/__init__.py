"""legoc.passes.backend: the back-end stages of the compile pipeline, one per file, each a pass
with the same signature as the front end's (legoc.passes.infra):

build (build.py) -> measure-latency (measure_latency.py) -> measure-load (measure_load.py) ->
validate (validate.py) -> measure-rpc (measure_rpc.py) -> measure-energy (energy.py) -> tile (tile.py,
with ``--tiles``) -> write (write.py). tile.py also holds check-tiles, which the front end runs
right after prune so that ``--tiles`` on a model where nothing tiles fails before the build.

``stage.py`` holds what they share (the base class, the per-module records); ``manifest.py`` the
manifest the build stage writes and the others complete.
"""
from legoc.passes.backend.build import Build
from legoc.passes.backend.energy import MeasureEnergy
from legoc.passes.backend.measure_latency import MeasureLatency
from legoc.passes.backend.measure_load import MeasureLoad
from legoc.passes.backend.measure_rpc import MeasureRpc
from legoc.passes.backend.tile import CheckTiles, Tile
from legoc.passes.backend.validate import Validate
from legoc.passes.backend.write import Write

__all__ = ["Build", "CheckTiles", "MeasureEnergy", "MeasureLatency", "MeasureLoad", "MeasureRpc", "Tile", "Validate",
           "Write"]
