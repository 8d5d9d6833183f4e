"""Frames in and out: validation, resize policies and file I/O.

The engine's frame layout is ComfyUI's IMAGE layout: float32 [F, H, W, 3] in 0..1 on the CPU.
"""

from __future__ import annotations

import logging
import operator
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AnyV2VError

logger = logging.getLogger("AnyV2V")

RESIZE_POLICIES = ("stretch", "crop", "pad")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_size(size_wh: tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    try:
        width, height = (operator.index(v) for v in size_wh)
    except (TypeError, ValueError):
        raise AnyV2VError(f"working size must be two integers (width, height), got {size_wh!r}") from None
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise AnyV2VError(
            f"working size {width}x{height} is not usable: width and height must be positive multiples of {multiple} "
            f"(e.g. {max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)})"
        )
    return width, height


def check_frames(frames: torch.Tensor, what: str = "frames", *, min_frames: int = 1) -> torch.Tensor:
    """Validate an IMAGE batch [F, H, W, 3] float in 0..1 and return it as float32 on the CPU."""
    if not isinstance(frames, torch.Tensor):
        raise AnyV2VError(f"{what} must be a tensor [frames, height, width, 3], got {type(frames).__name__}")
    shape = list(frames.shape)
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        hint = " (channels first? use [frames, height, width, 3])" if frames.ndim == 4 and frames.shape[1] == 3 else ""
        hint = hint or (" (RGBA? drop the alpha channel)" if frames.ndim == 4 and frames.shape[-1] == 4 else "")
        hint = hint or (" (grayscale? repeat it to 3 channels)" if len(shape) == 3 or shape[-1:] == [1] else "")
        hint = hint or (" (a batch of videos? pass one video)" if len(shape) == 5 else "")
        raise AnyV2VError(f"{what} must have the layout [frames, height, width, 3], got shape {shape}{hint}")
    if frames.shape[0] < min_frames:
        raise AnyV2VError(f"{what} has {frames.shape[0]} frame(s); at least {min_frames} are needed")
    frames = frames.detach().to("cpu", torch.float32)
    if not torch.isfinite(frames).all():
        raise AnyV2VError(f"{what} contains NaN or infinite values; check the node or file that produced them")
    low, high = float(frames.min()), float(frames.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise AnyV2VError(f"{what} values must be in 0..1 (got {low:.3g}..{high:.3g}); scale 8-bit images by 1/255")
    return frames.clamp(0, 1)


def resize_frames(frames: torch.Tensor, size_wh: tuple[int, int], policy: str = "stretch") -> torch.Tensor:
    """Resize frames [F, H, W, 3] to size_wh with a policy.

    stretch: scale each axis independently (the reference's behaviour).
    crop: scale to cover the target keeping the aspect ratio, then centre-crop.
    pad: scale to fit inside the target keeping the aspect ratio, then pad with black, centred.
    """
    if policy not in RESIZE_POLICIES:
        raise AnyV2VError(f"resize policy {policy!r} is unknown; use one of {', '.join(RESIZE_POLICIES)}")
    width, height = size_wh
    src_h, src_w = frames.shape[1], frames.shape[2]
    if (src_w, src_h) == (width, height):
        return frames
    if policy == "stretch":
        return _resample(frames, width, height)
    scale = (max if policy == "crop" else min)(width / src_w, height / src_h)
    scaled_w, scaled_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    scaled = _resample(frames, scaled_w, scaled_h)
    if policy == "crop":
        top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
        return scaled[:, top : top + height, left : left + width]
    canvas = frames.new_zeros(frames.shape[0], height, width, 3)
    top, left = (height - scaled_h) // 2, (width - scaled_w) // 2
    canvas[:, top : top + scaled_h, left : left + scaled_w] = scaled
    return canvas


def _resample(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    # antialiased bicubic approximates the reference's PIL LANCZOS on downscales
    chw = frames.permute(0, 3, 1, 2)
    out = F.interpolate(chw, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def prepare_frames(
    frames: torch.Tensor,
    *,
    size_wh: tuple[int, int] = (512, 512),
    resize: str = "stretch",
    num_frames: int | None = None,
    min_frames: int = 2,
) -> torch.Tensor:
    """Validate, trim to num_frames (the first ones) and resize frames to the working size."""
    frames = check_frames(frames, "source frames", min_frames=min_frames)
    size_wh = check_size(size_wh)
    if num_frames is not None:
        if num_frames < min_frames:
            raise AnyV2VError(f"frame count {num_frames} is too small; use at least {min_frames}")
        if frames.shape[0] < num_frames:
            raise AnyV2VError(
                f"the source has {frames.shape[0]} frames but {num_frames} were asked for; "
                f"lower the frame count to at most {frames.shape[0]}"
            )
        frames = frames[:num_frames]
    return resize_frames(frames, size_wh, resize)


def prepare_first_frame(image: torch.Tensor, *, size_wh: tuple[int, int], resize: str = "stretch",
                        source_wh: tuple[int, int] | None = None) -> torch.Tensor:
    """The edited first frame [1, H, W, 3] at the working size, resized with the source's policy.

    A frame whose aspect ratio matches neither the working size nor the source's (`source_wh`, the
    source video's original size) is still resized, with a warning: the policy then maps it
    differently from the source frames, so the edit may not line up with the source's structure.
    """
    image = check_frames(image, "edited first frame")
    if image.shape[0] != 1:
        raise AnyV2VError(f"the edited first frame must be one image, got a batch of {image.shape[0]}; pick one")
    size_wh = check_size(size_wh)
    image_wh = (int(image.shape[2]), int(image.shape[1]))
    if all(abs(image_wh[0] * h / (image_wh[1] * w) - 1) > 0.02 for w, h in filter(None, (size_wh, source_wh))):
        reference = f"the source's {source_wh[0]}x{source_wh[1]}" if source_wh else f"the working size {size_wh[0]}x{size_wh[1]}"
        logger.warning("the edited first frame is %dx%d, another aspect ratio than %s; the %r resize policy will not "
                       "map it like the source frames, so the edit may not line up: edit the first frame at the "
                       "source's aspect ratio", image_wh[0], image_wh[1], reference, resize)
    return resize_frames(image, size_wh, resize)


# ---------------------------------------------------------------------------------------------- file I/O


def video_files(path: str | os.PathLike) -> list[Path]:
    """The files `read_frames` reads for a video source: the video file, or a folder's images sorted by name."""
    path = Path(path)
    if not path.exists():
        raise AnyV2VError(f"video {path} does not exist; pass a video file or a folder of frames")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AnyV2VError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the frames there")
    return files


def read_frames(path: str | os.PathLike) -> tuple[torch.Tensor, float | None]:
    """Frames [F, H, W, 3] and fps (None for an image folder) from a video file or a folder of images."""
    files = video_files(path)
    path = Path(path)
    if path.is_dir():
        return torch.stack([read_image(p)[0] for p in files]), None
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
        while capture.isOpened():
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()
    if not frames:
        raise AnyV2VError(f"could not read any frame from {path}: the file is corrupt or not a video OpenCV can decode")
    return torch.stack(frames).float() / 255.0, (float(fps) if fps and fps > 0 else None)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as [1, H, W, 3] float32 in 0..1 (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise AnyV2VError(f"could not read image {path}: {error}") from None
    return torch.from_numpy(rgb.copy()).unsqueeze(0)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def check_output_path(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse to overwrite an existing file unless asked, and fail early on a missing/unwritable folder."""
    path = Path(path)
    if path.is_dir():
        raise AnyV2VError(f"{path} is a folder; give the output a file name (e.g. {path / 'edit.mp4'})")
    if path.exists() and not overwrite:
        raise AnyV2VError(f"{path} already exists; pass --overwrite (overwrite=True) or choose another output path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AnyV2VError(f"output folder {folder} does not exist; create it first")
    try:  # a real write: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise AnyV2VError(f"output folder {folder} is not writable ({error.strerror}); choose another output path") from None
    return path


def _write_atomically(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename, so a failure never leaves half a
    file and never touches an existing `path`. OSErrors (disk full, permissions) become AnyV2VError."""
    tmp_name = str(path.parent / f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")
    try:  # not mkstemp: its files are private (0600); this one gets the user's umask like any new file
        os.close(os.open(tmp_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as error:
        raise AnyV2VError(f"cannot write in {path.parent} ({error.strerror}); choose another output path") from None
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise AnyV2VError(f"could not write {path} ({error}); check the free disk space and permissions") from error
        raise


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, *, overwrite: bool = False) -> Path:
    """Write frames [F, H, W, 3] as an H.264 mp4 (ffmpeg from imageio-ffmpeg)."""
    import imageio.v2 as imageio

    path = check_output_path(path, overwrite=overwrite)
    pixels = to_uint8(frames)

    def write(tmp_name: str) -> None:
        with imageio.get_writer(tmp_name, format="FFMPEG", fps=float(fps), codec="libx264", macro_block_size=1,
                                quality=8, pixelformat="yuv420p" if _even(pixels) else "yuv444p") as writer:
            for frame in pixels:
                writer.append_data(frame)

    _write_atomically(path, write)
    return path


def _even(pixels: np.ndarray) -> bool:
    return pixels.shape[1] % 2 == 0 and pixels.shape[2] % 2 == 0


def write_image(path: str | os.PathLike, image: torch.Tensor, *, overwrite: bool = False) -> Path:
    """Write one image [H, W, 3] (or [1, H, W, 3]) as PNG."""
    from PIL import Image

    path = check_output_path(path, overwrite=overwrite)
    pixels = to_uint8(image.reshape(-1, *image.shape[-3:])[0] if image.ndim == 4 else image)
    _write_atomically(path, lambda tmp_name: Image.fromarray(pixels).save(tmp_name, format="PNG"))
    return path
