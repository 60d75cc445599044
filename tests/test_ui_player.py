"""The web demo's reply player never hands the page an empty stream.

Gradio gives the page a streamed reply's playlist with its first chunk, and waits only briefly for the ffmpeg
encoder's first AAC frames; an encoder not up by then (a busy machine) leaves the playlist empty and the
page's HLS player raises a fatal error. Here the encoder's start-up wait is taken away entirely, the worst case
of a slow start: the reply player's first chunk still carries audio, a plain gr.Audio's does not.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ui.app import FIRST_AUDIO_BYTES, ffmpeg_on_path, reply_player
from ui.tab import OUTPUT_RATE, wav


def first_segment(player, monkeypatch, stream_id: str):
    import gradio.audio_stream_encoder as enc

    monkeypatch.setattr(enc, "STARTUP_WAIT", 0.0)  # the encoder is never up in time
    ffmpeg_on_path()
    t = np.arange(FIRST_AUDIO_BYTES // 2) / OUTPUT_RATE
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    try:
        chunk, data = asyncio.run(player.stream_output(wav(pcm), stream_id, True))
    finally:
        player.end_stream_output(stream_id)
    assert data["is_stream"]
    return chunk


def test_the_first_chunk_of_a_reply_stream_has_audio(monkeypatch):
    chunk = first_segment(reply_player(), monkeypatch, "s/1/1/playlist.m3u8")
    assert chunk is not None and chunk["extension"] == ".aac" and chunk["duration"] > 0


def test_planted_a_plain_audio_opens_its_stream_empty(monkeypatch):
    import gradio as gr

    assert first_segment(gr.Audio(streaming=True), monkeypatch, "s/2/1/playlist.m3u8") is None
