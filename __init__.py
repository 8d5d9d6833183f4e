"""AnyV2V for ComfyUI: registration only.

ComfyUI imports this folder as a package from custom_nodes/. The engine, `anyv2v_core`, is a
plain top-level package (the CLI and the tests import it that way), so this folder is appended to
sys.path: appended, not prepended, so nothing here can shadow a ComfyUI module (ComfyUI has its
own `nodes` module; ours is only ever imported relatively).
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

# pytest, collecting tests/, imports this file as a lone module (no package) when the checkout's folder
# name is not a Python identifier (a clone into ComfyUI-AnyV2V/); there is nothing to register then.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

# the frontend extension (web/anyv2v.js): CaptureFeatures shows the taus that act on its backbone
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
