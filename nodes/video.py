"""AnyV2VSelectFrames: pick the clip AnyV2V edits out of a longer video's frames.

Core `LoadVideo` -> `GetVideoComponents` gives every frame at the file's frame rate; I2V models
generate short clips (I2VGen-XL: 16 frames at 8 fps), so a user typically keeps every n-th frame
of a few seconds.
"""

from __future__ import annotations


class AnyV2VSelectFrames:
    DESCRIPTION = (
        "Keeps a clip of the video's frames: from a start frame, every n-th frame, up to a frame count. "
        "Use it between GetVideoComponents and DDIMInvertVideo, e.g. every 3rd frame of a 24 fps video gives "
        "the 8 fps motion I2VGen-XL was trained on."
    )
    CATEGORY = "AnyV2V/video"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = ("The selected frames (an IMAGE batch).",
                       "Their frame rate: the input fps divided by every_nth, to play the clip at real speed.")
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The video's frames, e.g. the images output of GetVideoComponents."}),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01,
                                  "tooltip": "Frame rate of the input frames (connect GetVideoComponents' fps)."}),
                "start_frame": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                        "tooltip": "Index of the first frame to keep (0 = the first frame)."}),
                "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000,
                                      "tooltip": "Keep one frame out of every n (1 keeps them all)."}),
                "frame_count": ("INT", {"default": 16, "min": 0, "max": 10_000,
                                        "tooltip": "How many frames to keep at most (0 = all that remain). "
                                                   "I2VGen-XL works best with 16."}),
            }
        }

    def select(self, frames, fps, start_frame, every_nth, frame_count):
        total = int(frames.shape[0])
        if start_frame >= total:
            raise ValueError(f"start_frame {start_frame} is past the end of the video ({total} frames); "
                             f"use a value below {total}")
        stop = total if frame_count == 0 else min(total, start_frame + frame_count * every_nth)
        return (frames[start_frame:stop:every_nth], float(fps) / every_nth)


NODE_CLASS_MAPPINGS = {"AnyV2VSelectFrames": AnyV2VSelectFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"AnyV2VSelectFrames": "AnyV2V Select Frames"}
