"""Model input features: Whisper log-mel for audio, Qwen2-VL patches for images and video.

Plain torch/numpy. Each function matches the reference preprocessing of Qwen2.5-Omni
(transformers' WhisperFeatureExtractor, Qwen2VLImageProcessor and qwen-omni-utils' video
rules); tests/test_features.py holds the parity proofs and the tolerances.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
# The released preprocessor_config.json has chunk_length 300 (n_samples 4_800_000): the
# reference pads every clip to 300 s and silently truncates longer ones. We keep the truncation.
MAX_AUDIO_SAMPLES = 300 * SAMPLE_RATE

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: sides are multiples of one merged 2x2 patch
IMAGE_MIN_PIXELS = 3136  # preprocessor_config.json min_pixels (4 * 28 * 28)
IMAGE_MAX_PIXELS = 12845056  # preprocessor_config.json max_pixels (16384 * 28 * 28)
MAX_ASPECT_RATIO = 200
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-omni-utils (v2_5/vision_process.py) video rules.
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # budget shared by all frames of one video


# ---------------------------------------------------------------- audio


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # Slaney scale: linear below 1 kHz, log above
    logstep = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * logstep, 3.0 * f / 200.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = 128) -> torch.Tensor:
    """Slaney-normalised triangular filters on the Slaney mel scale, 0..8 kHz. -> (n_mels, N_FFT//2+1)"""
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(8000.0)), n_mels + 2))
    slopes = edges[None, :] - fft_freqs[:, None]  # (bins, n_mels+2)
    diff = np.diff(edges)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= 2.0 / (edges[2:] - edges[:-2])[None, :]
    return torch.from_numpy(fb.T.copy()).float()


def num_mel_frames(num_samples: int) -> int:
    """Valid mel frames of a clip, as the reference's feature_attention_mask counts them."""
    return math.ceil(min(num_samples, MAX_AUDIO_SAMPLES) / HOP_LENGTH)


def log_mel(audio, n_mels: int = 128, max_samples: int = MAX_AUDIO_SAMPLES) -> torch.Tensor:
    """16 kHz mono float audio (L,) -> log-mel (n_mels, ceil(min(L, max_samples) / 160)).

    Equals the valid frames of WhisperFeatureExtractor(padding="max_length") without padding
    to 300 s: the clip is zero-padded just far enough that every frame which sees signal is
    computed, so the edge frames and the global `max - 8` clamp match the padded reference.
    Clips longer than max_samples are truncated, as the reference does.
    """
    x = torch.as_tensor(np.asarray(audio) if not torch.is_tensor(audio) else audio).float().flatten()
    if x.numel() == 0:
        raise ValueError("audio is empty; need at least one sample of 16 kHz mono audio")
    x = x[:max_samples]
    n_valid = math.ceil(x.numel() / HOP_LENGTH)
    # Frames centred past L + N_FFT/2 see only zeros (log10(1e-10) = -10, never above the max);
    # up to max_samples the reference's signal is zeros, and at max_samples it reflects, as here.
    target = min(max_samples, (n_valid + 4) * HOP_LENGTH + N_FFT)
    x = F.pad(x, (0, max(0, target - x.numel())))
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = (spec[:, :-1].abs() ** 2).contiguous()  # the reference drops the last frame
    log_spec = torch.clamp(mel_filters(n_mels) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0)[:, :n_valid]


# ---------------------------------------------------------------- images


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target size (transformers' version): sides multiple of factor, area in range.

    qwen-omni-utils' copy differs only for sides that round to 0 (< factor/2 px): it clamps
    them to factor first. Both agree everywhere else.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {height}x{width}; crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _pil_coeffs(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's antialiased bicubic taps (Resample.c precompute_coeffs + 8 bpc fixed point).
    -> source index (out, K) int64, weight (out, K) int64 scaled by 2**22."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)[None, :]
    w = _bicubic((taps + xmin[:, None] - centers[:, None] + 0.5) / fscale)
    w = np.where(taps < xmax[:, None], w, 0.0)
    ww = w.sum(1, keepdims=True)
    w = np.where(ww != 0.0, w / np.where(ww != 0.0, ww, 1.0), w)
    w = np.trunc(w * (1 << 22) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
    idx = np.minimum(xmin[:, None] + taps, in_size - 1)
    return torch.from_numpy(idx), torch.from_numpy(w)


def _pil_pass(img: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One separable pass along dim of a (C, H, W) int64 image, rounded to uint8 range as PIL does."""
    idx, w = _pil_coeffs(img.shape[dim], out_size)
    shape = [1, 1, 1]
    shape[dim] = out_size
    acc = torch.full((), 1 << 21, dtype=torch.int64)
    for k in range(idx.shape[1]):
        acc = acc + img.index_select(dim, idx[:, k]) * w[:, k].view(shape)
    return (acc >> 22).clamp_(0, 255)


def resize_image(img: torch.Tensor, height: int, width: int, vertical_first: bool = False) -> torch.Tensor:
    """PIL Image.resize(BICUBIC) on uint8 (H, W, 3): PIL's taps and 8-bit fixed point, each pass
    rounded to 8 bits. -> uint8 (height, width, 3)

    Pillow <= 12 always runs the horizontal pass first, which is what we do. Pillow 13 picks the
    order by a cost heuristic and sometimes runs the vertical pass first (mostly when the height
    shrinks and the width grows); then results differ by at most one level on some pixels.
    """
    x = img.permute(2, 0, 1).to(torch.int64)  # (C, H, W)
    for dim, size in ((1, height), (2, width)) if vertical_first else ((2, width), (1, height)):
        if x.shape[dim] != size:
            x = _pil_pass(x, size, dim)
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CPU resize of uint8 video (BICUBIC, antialias), which qwen-omni-utils uses
    for video frames: torch's native uint8 kernel. (T, H, W, 3) uint8 -> (T, height, width, 3)"""
    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).contiguous()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


def normalize(img: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): rescale 1/255 (in float64, as the
    reference), then mean/std (CLIP's unless given; Qwen3-Omni's are 0.5) in float32."""
    x = (img.to(torch.float64) * (1 / 255)).float().movedim(-1, -3)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def patchify(
    frames: torch.Tensor, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) float -> (grid_t*grid_h*grid_w, C*tp*p*p), (grid_t, grid_h, grid_w).

    Rows run over time, then merge blocks (row-major), then the 2x2 patches inside a block, so
    each merger group of merge_size**2 rows is contiguous. A row is (C, tp, p, p), the layout
    of the vision Conv3d. An odd frame count repeats the last frame, as the reference.
    """
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, C, tp, p, p)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


def _as_uint8(img, ndim: int) -> torch.Tensor:
    x = img if torch.is_tensor(img) else torch.from_numpy(np.ascontiguousarray(img))
    if x.dtype != torch.uint8 or x.ndim != ndim or x.shape[-1] != 3:
        want = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
        raise ValueError(f"expected uint8 RGB {want}; got {x.dtype} {tuple(x.shape)}")
    return x


def patchify_image(
    img, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
    patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE, merge_size: int = MERGE_SIZE,
    mean=IMAGE_MEAN, std=IMAGE_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (H, W, 3) -> pixel_values (N, 3*tp*p*p) float32, grid_thw (1, 3) int64 [[1, h, w]].
    The image fills both temporal slots."""
    x = _as_uint8(img, 3)
    h, w = smart_resize(x.shape[0], x.shape[1], patch_size * merge_size, min_pixels, max_pixels)
    x = normalize(resize_image(x, h, w), mean, std)[None]
    pv, (_, gh, gw) = patchify(x.expand(temporal_patch_size, -1, -1, -1), patch_size, temporal_patch_size, merge_size)
    return pv, torch.tensor([[1, gh, gw]])


def video_frame_size(
    height: int, width: int, num_frames: int, min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS, total_pixels: int = VIDEO_TOTAL_PIXELS, factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """Per-frame size for a video of num_frames (qwen-omni-utils fetch_video): the per-frame cap
    is the smaller of max_pixels and an even share of total_pixels, floored at 1.05 * min_pixels.
    factor: patch_size * merge_size (28 for Qwen2.5, 32 for Qwen3's 16-pixel patches)."""
    cap = max(min(max_pixels, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels, cap)


def patchify_video(
    frames, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS, patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE, merge_size: int = MERGE_SIZE,
    mean=IMAGE_MEAN, std=IMAGE_STD, factor: int = IMAGE_FACTOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (T, H, W, 3) sampled frames -> pixel_values_videos (N, 3*tp*p*p) float32,
    grid_thw (1, 3) int64. Frames already at video_frame_size (load_video's) are not resized."""
    x = _as_uint8(frames, 4)
    if x.shape[0] == 0:
        raise ValueError("video has no frames")
    h, w = video_frame_size(x.shape[1], x.shape[2], x.shape[0], min_pixels, max_pixels, total_pixels, factor)
    pv, grid = patchify(normalize(resize_frames(x, h, w), mean, std), patch_size, temporal_patch_size, merge_size)
    return pv, torch.tensor([grid])


def num_video_frames(
    total_frames: int, video_fps: float, fps: float = VIDEO_FPS, min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> int:
    """qwen-omni-utils smart_nframes: duration * fps, clamped to [min_frames, max_frames] and
    to total_frames, floored to an even count. Raises if fewer than 2 frames remain."""
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total_frames / video_fps * fps, lo), hi), total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"video needs at least {FRAME_FACTOR} frames; it has {total_frames}")
    return n


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float = VIDEO_FPS, min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> list[int]:
    """Indices of the frames to keep: linspace(0, total-1, n) rounded (half to even, as torch)."""
    n = num_video_frames(total_frames, video_fps, fps, min_frames, max_frames)
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def second_per_grid(fps: float = VIDEO_FPS, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> float:
    """Seconds per temporal grid as the reference processor states it: temporal_patch_size / fps,
    with fps the requested rate (2.0 unless given), not the rate the sampling achieved."""
    return temporal_patch_size / fps
