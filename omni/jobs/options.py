"""Job options that the command line needs before anything heavy is imported (no torch, no PyAV)."""

from __future__ import annotations

from dataclasses import dataclass

# encoders.features' values (a test keeps them equal), here so `omni --help` does not import torch
VIDEO_FPS = 2.0
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
FRAME_FACTOR = 2


@dataclass(frozen=True)
class DecodeOptions:
    fps: float = VIDEO_FPS  # frames per second sampled from video
    segment_seconds: float = 30.0  # cut longer media into segments of this length; 0: one segment
    max_frames: int = VIDEO_MAX_FRAMES  # per segment
    max_pixels: int = VIDEO_MAX_PIXELS  # per frame
