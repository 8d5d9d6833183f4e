"""The ComfyUI nodes: thin adapters that validate inputs, call the engine and convert types.

Importing this package is cheap: no torch, diffusers or engine import happens before a node runs.
"""

from . import first_frame, injection, inversion, loaders, sampling, video, wan

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in (loaders, video, inversion, injection, first_frame, sampling, wan):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
