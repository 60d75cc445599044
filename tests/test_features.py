"""Parity of encoders/features.py with transformers' preprocessing, and omni/media.py decoding.

Oracles: WhisperFeatureExtractor (as Qwen2_5OmniProcessor calls it), Qwen2VLImageProcessorPil
(needs pillow), the patchify of transformers' Qwen2VLVideoProcessor (its module needs
torchvision, so the method's source is compiled on its own), qwen-omni-utils' frame rules.

Tolerances: log-mel 2e-6 abs (measured: 0 to 1.2e-7); image patches exact where Pillow runs the
horizontal pass first, else within one uint8 level (Pillow 13 pass-order heuristic, see
features.resize_image); video layout exact.
"""

import ast
import math
import struct

import numpy as np
import pytest
import torch

from encoders import features as Fe
from omni import media as M
from tests import media as mk

torch.set_num_threads(1)
PIL = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_vl  # noqa: E402

LEVEL = 1 / 255 / min(Fe.IMAGE_STD)  # one uint8 step after normalisation


# ---------------------------------------------------------------- log-mel


@pytest.fixture(scope="module")
def whisper():
    # The released Qwen2.5-Omni preprocessor_config: 128 mels, chunk_length 300 s.
    return WhisperFeatureExtractor(feature_size=128, chunk_length=300)


def reference_mel(fe, audio):
    """What Qwen2_5OmniProcessor._process_audio computes, cut to the valid frames."""
    out = fe(audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    n = int(out["attention_mask"].sum())
    return out["input_features"][0, :, :n]


def test_mel_filters_equal_transformers():
    ref = mel_filter_bank(201, 128, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(Fe.mel_filters(128), torch.from_numpy(ref.T).float(), rtol=0, atol=1e-8)


def speechy(samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = mk.tone(samples / 16000, freq=200.0, chirp_to=6000.0)[:samples] + rng.normal(0, 0.02, samples)
    a[-400:] *= 6.0  # loud tail: the edge frames and the global max sit at the clip's end
    return a.astype(np.float32)


@pytest.mark.parametrize("samples", [100, 16000, 80000, 116800, 116837])  # <1 hop, 1 s, 5 s, 7.3 s, 7.3 s + 37
def test_log_mel_equals_whisper_valid_frames(whisper, samples):
    audio = speechy(samples)
    ref = reference_mel(whisper, audio)
    ours = Fe.log_mel(audio)
    assert ours.shape == ref.shape == (128, math.ceil(samples / 160))
    assert Fe.num_mel_frames(samples) == ref.shape[1]
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def test_log_mel_quiet_clip_uses_global_clamp(whisper):
    audio = np.zeros(32000, np.float32)
    audio[16000:16100] = 0.9  # one click: most frames sit on the max - 8 floor
    torch.testing.assert_close(Fe.log_mel(audio), reference_mel(whisper, audio), rtol=0, atol=2e-6)


def test_log_mel_truncates_like_reference():
    fe30 = WhisperFeatureExtractor(feature_size=128)  # 30 s variant keeps the test fast
    audio = speechy(31 * 16000 + 77)
    ref = reference_mel(fe30, audio)
    ours = Fe.log_mel(audio, max_samples=fe30.n_samples)
    assert ours.shape == ref.shape == (128, 3000)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    assert Fe.MAX_AUDIO_SAMPLES == 4_800_000 and Fe.num_mel_frames(10**8) == 30000


def test_planted_mel_bugs_are_caught(whisper):
    audio = speechy(116837)
    ref = reference_mel(whisper, audio)
    # Bug 1: STFT on the bare clip (reflect padding at its end instead of the reference's zeros).
    x = torch.from_numpy(audio)
    spec = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)[:, : ref.shape[1]]
    bare = torch.clamp(Fe.mel_filters(128) @ spec.abs() ** 2, min=1e-10).log10()
    bare = (torch.maximum(bare, bare.max() - 8.0) + 4.0) / 4.0
    assert bare.shape == ref.shape and (bare - ref).abs().max() > 1e-2
    # Bug 2: one frame short of the reference's count.
    assert Fe.log_mel(audio[:-37]).shape[1] != ref.shape[1]


def test_log_mel_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        Fe.log_mel(np.zeros(0, np.float32))


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("hw", [(1, 1), (10, 1900), (37, 53), (224, 224), (480, 640), (1000, 300), (28, 5600),
                                (4000, 3000), (13, 2000), (5000, 7000)])
@pytest.mark.parametrize("limits", [(Fe.IMAGE_MIN_PIXELS, Fe.IMAGE_MAX_PIXELS), (100352, 602112), (3136, 200 * 784)])
def test_smart_resize_equals_transformers(hw, limits):
    assert Fe.smart_resize(*hw, 28, *limits) == hf_vl.smart_resize(*hw, 28, *limits)


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        Fe.smart_resize(1, 201)
    with pytest.raises(ValueError, match="no pixels"):
        Fe.smart_resize(0, 10)


def hf_patches(img, min_pixels=Fe.IMAGE_MIN_PIXELS, max_pixels=Fe.IMAGE_MAX_PIXELS):
    p = hf_vl.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = p(PIL.fromarray(img), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


IMAGE_CASES = [  # (h, w, max_pixels): upscale, square, landscape, portrait, wide, tiny, max_pixels downscale
    (37, 53, None), (224, 224, None), (300, 400, None), (417, 259, None), (96, 1000, None), (10, 90, None),
    (480, 640, 200 * 28 * 28), (700, 500, 160 * 28 * 28),
]


@pytest.mark.parametrize("h,w,max_pixels", IMAGE_CASES)
def test_patchify_image_equals_qwen2vl_processor(h, w, max_pixels):
    img = mk.pattern_image(h, w, seed=h)
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    ref, ref_grid = hf_patches(img, **kw)
    ours, grid = Fe.patchify_image(img, **kw)
    assert grid.tolist() == ref_grid.tolist()
    th, tw = grid[0, 1].item() * 14, grid[0, 2].item() * 14
    pil = np.asarray(PIL.fromarray(img).resize((tw, th), PIL.Resampling.BICUBIC))
    if np.array_equal(Fe.resize_image(torch.from_numpy(img), th, tw).numpy(), pil):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # same float ops: exact in practice
    else:  # Pillow 13 ran the vertical pass first: our other order must then equal it exactly
        v_first = Fe.resize_image(torch.from_numpy(img), th, tw, vertical_first=True)
        assert np.array_equal(v_first.numpy(), pil)
        pv, _ = Fe.patchify(Fe.normalize(v_first)[None].expand(2, -1, -1, -1))
        torch.testing.assert_close(pv, ref, rtol=0, atol=1e-6)
        # and our fixed order stays close: measured <= 8 levels on ~1% of values (96x1000 -> 112x980)
        close = (ours - ref).abs() <= LEVEL * 1.001
        assert (ours - ref).abs().max() <= 10 * LEVEL and close.float().mean() > 0.95


@pytest.mark.parametrize("hw,out", [((480, 640), (252, 336)), ((37, 53), (56, 84)), ((300, 200), (308, 196)),
                                    ((480, 640), (476, 644)), ((100, 90), (100, 300)), ((64, 700), (24, 936))])
def test_resize_kernel_is_pils_in_one_pass_order(hw, out):
    img = mk.pattern_image(*hw, seed=3)
    pil = np.asarray(PIL.fromarray(img).resize(out[::-1], PIL.Resampling.BICUBIC))
    t = torch.from_numpy(img)
    assert any(np.array_equal(Fe.resize_image(t, *out, vertical_first=v).numpy(), pil) for v in (False, True))


def test_planted_image_bugs_are_caught():
    img = mk.pattern_image(300, 400, seed=7)
    ref, _ = hf_patches(img)
    ours, _ = Fe.patchify_image(img)
    assert (Fe.patchify_image(img[:, ::-1])[0] - ref).abs().max() > 0.5  # mirrored image
    # 2x2 merge order transposed (mh <-> mw) inside each merger group
    swapped = ours.view(-1, 2, 2, ours.shape[1]).transpose(1, 2).reshape_as(ours)
    assert (swapped - ref).abs().max() > 0.5
    # torch's float bicubic resize instead of PIL's: several levels off
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=(308, 392), mode="bicubic", antialias=True)
    y = y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    pv, _ = Fe.patchify(Fe.normalize(y)[None].expand(2, -1, -1, -1))
    assert (pv - ref).abs().max() > 1.5 * LEVEL


# ---------------------------------------------------------------- video


def hf_video_patchify():
    """transformers' Qwen2VLVideoProcessor.patchify, compiled from its source (the module itself
    imports torchvision, which we do not install)."""
    import transformers.models.qwen2_vl as pkg

    path = pkg.__path__[0] + "/video_processing_qwen2_vl.py"
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    mod = ast.Module(body=[fn], type_ignores=[])
    ns = {"torch": torch}
    exec(compile(ast.fix_missing_locations(mod), path, "exec"), ns)
    return ns["patchify"]


@pytest.mark.parametrize("t", [2, 5, 6])
def test_patchify_video_layout_equals_reference(t):
    frames = torch.from_numpy(mk.moving_frames(t, 112, 168))  # aligned: no resize
    ours, grid = Fe.patchify_video(frames, min_pixels=3136)
    ref, gt, gh, gw = hf_video_patchify()(None, Fe.normalize(frames)[None], 14, 2, 2)
    assert grid.tolist() == [[gt, gh, gw]] == [[(t + 1) // 2, 8, 12]]
    torch.testing.assert_close(ours, ref[0], rtol=0, atol=0)
    # Planted bug: frames swapped inside each temporal pair.
    order = torch.arange(t + t % 2).view(-1, 2).flip(1).flatten().clamp(max=t - 1)
    assert not torch.equal(Fe.patchify_video(frames[order], min_pixels=3136)[0], ours)


def test_video_of_a_still_frame_equals_image_processor():
    img = mk.pattern_image(112, 168, seed=2)
    ours, grid = Fe.patchify_video(np.stack([img, img]), min_pixels=3136)
    ref, ref_grid = hf_patches(img)
    assert grid.tolist() == ref_grid.tolist()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_video_resize_is_torchvisions_uint8_kernel():
    frames = torch.from_numpy(mk.moving_frames(2, 96, 128))
    out = Fe.resize_frames(frames, 280, 392)
    x = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(280, 392), mode="bicubic",
                                        antialias=True)
    assert torch.equal(out, x.permute(0, 2, 3, 1))


@pytest.mark.parametrize("total,video_fps,expected", [
    (75, 25.0, [0, 15, 30, 44, 59, 74]),  # 3 s at 2 fps
    (30, 30.0, [0, 10, 19, 29]),  # 1 s: min_frames 4
    (3, 30.0, [0, 2]),  # fewer frames than min_frames: floor to even
    (252, 24.0, None),  # 10.5 s -> 21 -> 20
    (30000, 30.0, None),  # 1000 s -> max_frames 768
])
def test_frame_sampling_follows_qwen_omni_utils(total, video_fps, expected):
    idx = Fe.sample_frame_indices(total, video_fps)
    n = {252: 20, 30000: 768}.get(total, len(expected or []))
    assert len(idx) == n and idx[0] == 0 and idx[-1] == total - 1
    if expected:
        assert idx == expected


def test_frame_sampling_errors_and_grid_seconds():
    with pytest.raises(ValueError, match="at least 2 frames"):
        Fe.sample_frame_indices(1, 30.0)
    assert Fe.second_per_grid() == 1.0 and Fe.second_per_grid(4.0) == 0.5


@pytest.mark.parametrize("hw,n,expected", [
    ((720, 1280), 768, (336, 644)),  # total budget: 90316800 / 768 * 2 = 235200 px per frame
    ((720, 1280), 20, (560, 1008)),  # per-frame cap 768*28*28
    ((96, 128), 6, (280, 392)),  # small frames grow to 128*28*28
])
def test_video_frame_size_budget(hw, n, expected):
    assert Fe.video_frame_size(*hw, n) == expected
    h, w = expected
    cap = max(min(Fe.VIDEO_MAX_PIXELS, Fe.VIDEO_TOTAL_PIXELS / n * 2), int(Fe.VIDEO_MIN_PIXELS * 1.05))
    assert h % 28 == 0 and w % 28 == 0 and h * w <= max(cap, Fe.VIDEO_MIN_PIXELS * 1.1)


# ---------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    img = mk.pattern_image(60, 80, seed=4)
    f = {"img": img, "dir": d}
    (d / "a.png").write_bytes(mk.encode_image(img, "png"))
    (d / "a.jpg").write_bytes(mk.encode_image(img, "mjpeg"))
    (d / "a.webp").write_bytes(mk.encode_image(img, "libwebp"))
    (d / "rgba.png").write_bytes(mk.encode_image(mk.pattern_image(40, 50, seed=5, alpha=True), "png"))
    (d / "thin.png").write_bytes(mk.encode_image(np.zeros((2, 500, 3), np.uint8), "png"))
    mk.write_audio(d / "a.wav", mk.tone(2.0, 44100, 1000.0), 44100, "pcm_s16le", channels=2)
    mk.write_audio(d / "a.flac", mk.tone(1.5, 22050, 500.0), 22050, "flac")
    mk.write_video(d / "av.mp4", seconds=3.0, fps=25)
    mk.write_video(d / "silent.mp4", seconds=1.0, fps=10, audio=False)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.mp4").write_bytes(b"this is not a video file at all\n" * 20)
    full = (d / "av.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(full[: len(full) // 2])
    png = (d / "a.png").read_bytes()
    (d / "broken.png").write_bytes(png[:60] + bytes(200) + png[260:])
    # A WAV whose format tag names no codec FFmpeg has.
    data = np.zeros(1600, np.int16).tobytes()
    fmt = struct.pack("<HHIIHH", 0x7777, 1, 16000, 32000, 2, 16)
    (d / "odd.wav").write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16)
                                + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return f


def test_load_image_png_is_lossless(files):
    d = files["dir"]
    assert np.array_equal(M.load_image(d / "a.png"), files["img"])
    assert np.array_equal(M.load_image((d / "a.png").read_bytes()), files["img"])


def test_load_image_jpeg_webp_close_to_pil(files):
    d = files["dir"]
    for name, tol in (("a.jpg", 3.0), ("a.webp", 6.0)):
        ours = M.load_image(d / name).astype(float)
        pil = np.asarray(PIL.open(d / name).convert("RGB")).astype(float)
        assert ours.shape == pil.shape == (60, 80, 3)
        assert np.abs(ours - pil).mean() < tol, name  # different YUV->RGB code paths, same picture


def test_load_image_alpha_over_white_like_qwen_omni_utils(files):
    path = files["dir"] / "rgba.png"
    src = PIL.open(path)
    white = PIL.new("RGB", src.size, (255, 255, 255))
    white.paste(src, mask=src.split()[3])  # qwen-omni-utils to_rgb
    assert np.array_equal(M.load_image(path), np.asarray(white))


def test_load_audio_resamples_and_averages_channels(files):
    d = files["dir"]
    a = M.load_audio(d / "a.wav")
    assert a.dtype == np.float32 and abs(a.size - 32000) <= 32
    # channels are x and -0.5x: librosa's mono mean is 0.25x, amplitude 0.125
    assert abs(np.sqrt(np.mean(a[1000:-1000] ** 2)) - 0.125 / math.sqrt(2)) < 0.005
    spec = np.abs(np.fft.rfft(a[:16000]))
    assert abs(np.argmax(spec) - 1000) <= 2  # 1 kHz tone survives resampling
    b = M.load_audio(d / "a.flac")
    assert abs(b.size - 24000) <= 32


def test_load_video_samples_frames_and_audio(files):
    v = M.load_video(files["dir"] / "av.mp4")
    assert v.frames.shape == (6, 280, 392, 3) and v.frames.dtype == np.uint8
    assert v.duration == pytest.approx(3.0) and v.fps == pytest.approx(2.0) and v.second_per_grid == 1.0
    assert v.audio is not None and abs(v.audio.size - 48000) < 0.05 * 16000
    # The moving square's centre tracks the sampled indices [0, 15, 30, 44, 59, 74] of 75 frames.
    xs = [np.nonzero((f[..., 0] > 200) & (f[..., 1] > 200) & (f[..., 2] < 80))[1].mean() for f in v.frames]
    size = 24
    expect = [((128 - size) * i / 74 + size / 2) * 392 / 128 for i in [0, 15, 30, 44, 59, 74]]
    assert np.allclose(xs, expect, atol=8), (xs, expect)
    # Chirp 300 -> 3000 Hz: the pitch rises from the first to the last second.
    peak = [np.argmax(np.abs(np.fft.rfft(v.audio[s:s + 8000]))) * 2 for s in (0, v.audio.size - 8000)]
    assert peak[0] < 1200 < peak[1]
    pv, grid = Fe.patchify_video(v.frames)
    assert grid.tolist() == [[3, 20, 28]] and pv.shape == (3 * 20 * 28, 1176)


def test_load_video_without_audio(files):
    v = M.load_video(files["dir"] / "silent.mp4")
    assert v.audio is None and v.frames.shape[0] == 4 and v.fps == pytest.approx(4.0)


@pytest.mark.parametrize("call,name,msg", [
    (M.load_audio, "missing.wav", "no such file"),
    (M.load_audio, "", "directory"),
    (M.load_audio, "empty.wav", "empty file"),
    (M.load_video, "text.mp4", "not a media file"),
    (M.load_video, "a.wav", "no video stream"),
    (M.load_audio, "silent.mp4", "no audio stream"),
    (M.load_audio, "a.png", "no audio stream"),
    (M.load_image, "a.wav", "no image"),
    (M.load_video, "cut.mp4", "corrupt|truncated|not a media"),
    (M.load_image, "broken.png", "corrupt or truncated"),
    (M.load_audio, "odd.wav", "unsupported audio codec"),
    (M.load_image, "thin.png", "aspect ratio"),
])
def test_media_errors_name_the_file(files, call, name, msg):
    path = files["dir"] / name
    with pytest.raises(M.MediaError, match=msg) as e:
        call(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_media_error_on_empty_bytes_and_single_frame(files, tmp_path):
    with pytest.raises(M.MediaError, match="empty input"):
        M.load_image(b"")
    one = mk.write_video(tmp_path / "one.mp4", seconds=0.1, fps=10, audio=False)
    with pytest.raises(M.MediaError, match="need at least 2"):
        M.load_video(one)
