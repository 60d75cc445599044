"""examples/realtime_client.py against a real `omni serve` on loopback."""

import subprocess
import sys
import wave
from pathlib import Path

from omni.pipeline import OmniModel
from streaming.engine import Engine, EngineConfig
from streaming.server import ServerConfig
from tests import media as make
from tests.realtime import ServerThread

ROOT = Path(__file__).resolve().parents[1]


def test_realtime_client_example_streams_audio_and_frames(tmp_path, references):
    _, path = references("tiny")
    engine = Engine(OmniModel.load(path, speech=True), EngineConfig(max_sessions=2, max_context=2048,
                                                                    max_new_tokens=6, max_codes=40))
    server = ServerThread(engine, ServerConfig(port=0))
    try:
        make.write_audio(tmp_path / "q.wav", make.tone(1.5, chirp_to=1200), 16000)
        make.write_video(tmp_path / "clip.mp4", seconds=2.0)
        out = tmp_path / "reply.wav"
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "realtime_client.py"), "--url",
                            f"ws://127.0.0.1:{server.port}/v1", "--wav", str(tmp_path / "q.wav"), "--video",
                            str(tmp_path / "clip.mp4"), "--out", str(out), "--fast"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "[completed]" in r.stderr or "[incomplete]" in r.stderr, r.stderr
        with wave.open(str(out)) as w:
            assert w.getframerate() == 24000 and w.getnframes() > 0
        turn = server.turns[-1]  # the frames and the audio reached the model as one turn
        kinds = {type(p).__name__ for p in turn}
        assert kinds & {"Video", "Image"}, kinds
    finally:
        server.stop()
        engine.shutdown()
