"""Data planes: the server half (``dataplane``: the seam, the traffic meter, Flower messages), the
client half (``endpoint``), the registry that makes each plane folder reachable from the run
config (``registry``), the stream plane (``stream/``) and an in-process grid (``inprocess``).
Every folder here is a plane (``registry.load_planes`` imports each)."""
