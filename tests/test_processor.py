"""The processor end to end on media files made with PyAV, against transformers' pieces.

transformers' own Qwen2_5OmniProcessor cannot be built here (its video processor needs
torchvision), so the reference is assembled from its parts: the Qwen2 tokenizer, the Qwen2-VL
image processor (PIL), the Whisper feature extractor, the processor's own placeholder
expansion (`replace_*_token`) and the thinker's `get_rope_index`.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch

from omni import media
from omni.config import OmniConfig
from omni.processor import Processor
from omni.types import Audio, Image, Message, Text, Video
from tests import media as make
from tests.reference import hf_config

# Pixels: PNG decodes identically, so only the resize differs (PIL's bicubic vs ours, ~1 uint8 level);
# JPEG decoders (FFmpeg's vs libjpeg) differ by up to ~3 levels on a few pixels. One level after CLIP
# normalisation is 1/255/0.27 = 0.0145.
PIXEL_TOL = dict(atol=0.06, rtol=0)
PIXEL_MEAN_TOL = 2e-3
MEL_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "cat.png").write_bytes(make.encode_image(make.pattern_image(100, 150, seed=1)))
    (d / "dog.jpg").write_bytes(make.encode_image(make.pattern_image(300, 200, seed=2), "mjpeg"))
    make.write_audio(d / "question.wav", make.tone(5.0, freq=300, chirp_to=3000), 16000)
    make.write_video(d / "clip.mp4", seconds=3.0)  # H.264 + AAC
    make.write_video(d / "silent.mp4", seconds=2.5, audio=False)
    return d


@pytest.fixture(scope="module")
def setup(references):
    ref, path = references("tiny")
    cfg = OmniConfig.from_file(path)
    return Processor.from_dir(path, cfg.thinker_config), path


@functools.cache
def hf_parts(path):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from tests.reference import config

    tok = AutoTokenizer.from_pretrained(path)
    image_proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    fe = WhisperFeatureExtractor(feature_size=128)
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(hf_config(config("tiny")).thinker_config)
    return tok, image_proc, fe, thinker


def reference(path, messages, prompt_text: str):
    """transformers' processing of `prompt_text` (one placeholder per part) -> ids, features, positions."""
    from PIL import Image as PILImage
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor, _get_feat_extract_output_lengths

    tok, image_proc, fe, thinker = hf_parts(path)
    out = {"pixel_values": [], "image_grid_thw": [], "video_grid_thw": [], "mel": [], "frames": []}
    pieces = prompt_text.split("<|")
    text = pieces[0]
    parts = [p for m in messages for p in m.content if not isinstance(p, Text)]
    it = iter(parts)
    use_aiv = False
    for piece in pieces[1:]:
        name, rest = piece.split("|>", 1)
        if name in ("IMAGE", "AUDIO", "VIDEO"):
            part = next(it)
            if name == "IMAGE":
                img = PILImage.open(part.source).convert("RGB")
                r = image_proc(images=[img], return_tensors="pt")
                out["pixel_values"].append(r["pixel_values"])
                out["image_grid_thw"].append(r["image_grid_thw"])
                text += "<|IMAGE|>" * int(r["image_grid_thw"].prod() // 4)
            elif name == "AUDIO":
                wav = media.load_audio(part.source)
                r = fe(wav, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
                n = int(r["attention_mask"].sum())
                out["mel"].append(r["input_features"][0, :, :n])
                out["frames"].append(n)
                text += "<|AUDIO|>" * int(_get_feat_extract_output_lengths(torch.tensor(n)))
            else:
                v = media.load_video(part.source)
                from encoders.features import patchify_video

                _, grid = patchify_video(v.frames)
                out["video_grid_thw"].append(grid)
                if part.use_audio is False or v.audio is None:
                    text += "<|VIDEO|>" * int(grid.prod() // 4)
                else:
                    use_aiv = True
                    r = fe(v.audio, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
                    n = int(r["attention_mask"].sum())
                    out["mel"].append(r["input_features"][0, :, :n])
                    out["frames"].append(n)
                    fake = types.SimpleNamespace(
                        video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token="<|audio_bos|>",
                        audio_eos_token="<|audio_eos|>", video_token="<|VIDEO|>", audio_token="<|AUDIO|>",
                        get_chunked_index=lambda idx, n_: Qwen2_5OmniProcessor.get_chunked_index(None, idx, n_))
                    text += Qwen2_5OmniProcessor.replace_video_with_audio_token(
                        fake, {"video_grid_thw": grid, "video_second_per_grid": [v.second_per_grid]}, 0,
                        {"num_audio_tokens": _get_feat_extract_output_lengths(torch.tensor([n]))}, 0,
                        position_id_per_seconds=25, seconds_per_chunk=2.0)
            text += rest
        else:
            text += "<|" + piece
    ids = torch.tensor(tok(text)["input_ids"])
    videos = out["video_grid_thw"]
    pos, delta = thinker.get_rope_index(
        ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        image_grid_thw=torch.cat(out["image_grid_thw"]) if out["image_grid_thw"] else None,
        video_grid_thw=torch.cat(videos) if videos else None, use_audio_in_video=use_aiv,
        audio_seqlens=torch.tensor(out["frames"]) if out["frames"] else None,
        second_per_grids=torch.tensor([1.0] * len(videos)) if videos else None)
    return ids, out, pos[:, 0], int(delta) + len(ids)


def cases(f):
    return {
        "text": [Message.of("user", "Hello, who are you?")],
        "image": [Message.of("user", Image(str(f / "cat.png")), "What is this?")],
        "two_images": [Message.of("user", Image(str(f / "cat.png")), Image(str(f / "dog.jpg")), "Compare.")],
        "audio": [Message.of("user", Audio(str(f / "question.wav")))],
        "video": [Message.of("user", Video(str(f / "silent.mp4")), "What moves?")],
        "audio_in_video": [Message.of("user", Video(str(f / "clip.mp4")), "What happens?")],
        "multi_turn": [
            Message.of("system", "You are terse."),
            Message.of("user", Image(str(f / "dog.jpg")), "Describe it."),
            Message.of("assistant", "A gradient."),
            Message.of("user", Audio(str(f / "question.wav")), Video(str(f / "clip.mp4")), "And now?"),
        ],
    }


@pytest.mark.parametrize("case", ["text", "image", "two_images", "audio", "video", "audio_in_video", "multi_turn"])
def test_processor_matches_reference(setup, files, case):
    proc, path = setup
    messages = cases(files)[case]
    prompt = proc(messages)
    ids, ref, pos, nxt = reference(path, messages, proc.render(messages))
    assert prompt.input_ids.tolist() == ids.tolist()
    assert torch.equal(prompt.positions, pos)
    assert prompt.next_position == nxt
    if ref["pixel_values"]:
        want = torch.cat(ref["pixel_values"])
        torch.testing.assert_close(prompt.pixel_values, want, **PIXEL_TOL)
        assert (prompt.pixel_values - want).abs().mean() < PIXEL_MEAN_TOL
        assert torch.equal(prompt.image_grid_thw, torch.cat(ref["image_grid_thw"]))
    else:
        assert prompt.pixel_values is None
    if ref["mel"]:
        torch.testing.assert_close(prompt.audio_features, torch.cat(ref["mel"], -1), **MEL_TOL)
        assert prompt.audio_feature_lens.tolist() == ref["frames"]
    if ref["video_grid_thw"]:
        assert torch.equal(prompt.video_grid_thw, torch.cat(ref["video_grid_thw"]))


def test_default_system_prompt_and_template(setup):
    proc, _ = setup
    text = proc.render([Message.of("user", "hi")])
    assert text == ("<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
                    "capable of perceiving auditory and visual inputs, as well as generating text and speech."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_mirrored_image_changes_pixels(setup, files, tmp_path):
    proc, _ = setup
    img = make.pattern_image(100, 150, seed=1)
    (tmp_path / "m.png").write_bytes(make.encode_image(img[:, ::-1].copy()))
    a = proc([Message.of("user", Image(str(files / "cat.png")))])
    b = proc([Message.of("user", Image(str(tmp_path / "m.png")))])
    assert (a.pixel_values - b.pixel_values).abs().max() > 1.0


@pytest.mark.parametrize("bad,match", [
    ("notmedia.png", "(not a media file|corrupt or truncated)"),
    ("missing.png", "no such file"),
    ("sliver.png", "aspect ratio must be at most 200:1"),  # too thin to patch; tiny images are upscaled, as the reference does
])
def test_bad_images_raise_media_error_naming_the_file(setup, tmp_path, bad, match):
    proc, _ = setup
    if bad == "notmedia.png":
        (tmp_path / bad).write_text("hello")
    if bad == "sliver.png":
        (tmp_path / bad).write_bytes(make.encode_image(make.pattern_image(2, 500)))
    with pytest.raises(media.MediaError, match=f"{bad}.*{match}"):
        proc([Message.of("user", Image(str(tmp_path / bad)))])


def test_audio_in_video_on_silent_video_is_an_error(setup, files):
    proc, _ = setup
    with pytest.raises(media.MediaError, match="no audio track"):
        proc([Message.of("user", Video(str(files / "silent.mp4"), use_audio=True))])


def test_in_memory_frames_equal_the_decoded_video(setup, files):
    """A camera's frames handed over in memory give the same prompt as the same frames from a file."""
    proc, _ = setup
    v = media.load_video(str(files / "clip.mp4"))
    from_file = proc([Message.of("user", Video(str(files / "clip.mp4")), "What happens?")])
    live = proc([Message.of("user", Video(v.frames, fps=2.0, audio=v.audio), "What happens?")])
    assert live.input_ids.tolist() == from_file.input_ids.tolist()
    assert torch.equal(live.positions, from_file.positions)
    assert torch.equal(live.pixel_values_videos, from_file.pixel_values_videos)
    assert torch.equal(live.audio_features, from_file.audio_features)
