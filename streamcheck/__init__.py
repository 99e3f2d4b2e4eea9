"""streamcheck: exact streaming of convolutional trunks over images larger than memory.

>>> import torch, torch.nn as nn, streamcheck
>>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
>>> streamed = streamcheck.Streamed(trunk, tile=64)
>>> streamed(torch.randn(1, 3, 256, 256)).shape
torch.Size([1, 8, 128, 128])
"""

from .annotations import load_mask
from .choose import choose_tile, free_bytes
from .defaults import host_memory_reuse, set_host_memory_reuse
from .errors import Problem, StreamcheckError
from .export import write_geojson, write_overlay
from .host_memory import keep_freed_host_memory
from .kept import DiskCache, HostCache
from .lsuv import lsuv_init
from .masks import tissue_mask
from .opening import open_image
from .planning import StreamPlan, Tile, plan
from .sources import ImageSource
from .splitting import Split, split
from .streaming import Streamed

__version__ = "0.1.0"

__all__ = [
    "DiskCache",
    "HostCache",
    "ImageSource",
    "Problem",
    "StreamPlan",
    "Split",
    "StreamcheckError",
    "Streamed",
    "Tile",
    "__version__",
    "choose_tile",
    "free_bytes",
    "host_memory_reuse",
    "keep_freed_host_memory",
    "load_mask",
    "lsuv_init",
    "open_image",
    "plan",
    "set_host_memory_reuse",
    "split",
    "tissue_mask",
    "write_geojson",
    "write_overlay",
]
