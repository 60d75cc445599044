"""Talk to `omni serve` with the unmodified openai SDK: stream a WAV and a video's frames in real
time, then save the spoken reply.

    python examples/realtime_client.py --wav question.wav --video clip.mp4 --out reply.wav \
        [--url ws://127.0.0.1:8000/v1] [--api-key KEY] [--fast]

The audio goes up as PCM16 24 kHz in 100 ms appends, the frames as JPEG at 2 fps
(`input_image_buffer.append`, the Qwen-Omni-Realtime video event), interleaved by their time,
paced like a live microphone and camera unless --fast. Then the client commits the turn and asks
for a response; the transcript prints as it arrives and the audio is written to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import time
import wave

import av
import numpy as np
from openai import AsyncOpenAI

RATE = 24000


def read_audio(path: str) -> np.ndarray:
    """Any audio file -> int16 mono at 24 kHz."""
    out = []
    with av.open(path) as c:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        for frame in c.decode(audio=0):
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


def read_frames(path: str, fps: float = 2.0) -> list[tuple[float, bytes]]:
    """(time, JPEG bytes) at about `fps` frames per second."""
    frames, next_t = [], 0.0
    with av.open(path) as c:
        for frame in c.decode(video=0):
            t = float(frame.time or 0.0)
            if t + 1e-6 < next_t:
                continue
            next_t = t + 1 / fps
            buf = io.BytesIO()
            with av.open(buf, "w", format="image2pipe") as out:
                s = out.add_stream("mjpeg", rate=1)
                s.width, s.height, s.pix_fmt = frame.width, frame.height, "yuvj420p"
                for p in s.encode(frame.reformat(format="yuvj420p")):
                    out.mux(p)
                for p in s.encode(None):
                    out.mux(p)
            frames.append((t, buf.getvalue()))
    return frames


async def main(args) -> int:
    client = AsyncOpenAI(api_key=args.api_key, websocket_base_url=args.url)
    pcm = read_audio(args.wav) if args.wav else np.zeros(0, np.int16)
    frames = read_frames(args.video) if args.video else []
    async with client.realtime.connect(model="omni") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                           "audio": {"input": {"turn_detection": None}}})
        # audio in 100 ms pieces and frames at their times, merged into one timeline
        step = RATE // 10
        events = [(i / RATE, "audio", pcm[i:i + step]) for i in range(0, len(pcm), step)]
        events += [(t, "frame", jpg) for t, jpg in frames]
        t0 = time.monotonic()
        for t, kind, data in sorted(events, key=lambda e: e[0]):
            if not args.fast:
                await asyncio.sleep(max(0.0, t - (time.monotonic() - t0)))
            if kind == "audio":
                await conn.input_audio_buffer.append(audio=base64.b64encode(data.tobytes()).decode())
            else:
                await conn.send({"type": "input_image_buffer.append", "image": base64.b64encode(data).decode()})
        if len(pcm):
            await conn.input_audio_buffer.commit()
        if args.text:
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": args.text}]})
        await conn.response.create()
        audio = bytearray()
        async for ev in conn:
            if ev.type == "response.output_audio.delta":
                audio += base64.b64decode(ev.delta)
            elif ev.type == "response.output_audio_transcript.delta":
                print(ev.delta, end="", flush=True)
            elif ev.type == "error":
                print(f"\nserver error: {ev.error.message}", file=sys.stderr)
            elif ev.type == "response.done":
                print(f"\n[{ev.response.status}]", file=sys.stderr)
                break
    with wave.open(args.out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(audio))
    print(f"wrote {args.out}: {len(audio) / 2 / RATE:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--wav", help="the question, any audio file")
    p.add_argument("--video", help="a video whose frames are sent as the camera")
    p.add_argument("--text", help="text to add to the turn")
    p.add_argument("--out", default="reply.wav")
    p.add_argument("--fast", action="store_true", help="do not pace the upload in real time")
    sys.exit(asyncio.run(main(p.parse_args())))
