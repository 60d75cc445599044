"""Streaming voice-activity detection with Silero VAD (the `silero-vad` wheel ships its model).

    vad = SileroVad(threshold=0.5, silence_ms=500)
    for kind, ms in vad.push(samples_16k):   # kind "start" | "stop"; ms from the first sample pushed
        ...

Silero scores 32 ms windows (512 samples at 16 kHz). Speech starts at the first window scoring
at least `threshold` and stops after `silence_ms` of windows scoring below `threshold - 0.15`
(the hysteresis Silero's own iterator uses). `push` is plain CPU work: callers on an event loop
run it in a thread.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch

SAMPLE_RATE = 16000
WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE

_template = None
_template_lock = threading.Lock()


def _model():
    """A fresh Silero model with its own recurrent state (the bundled weights load once)."""
    global _template
    with _template_lock:
        if _template is None:
            from silero_vad import load_silero_vad

            _template = load_silero_vad()
        return copy.deepcopy(_template)


class SileroVad:
    def __init__(self, threshold: float = 0.5, silence_ms: int = 500, min_speech_ms: int = 96):
        self.threshold, self.silence_ms, self.min_speech_ms = threshold, silence_ms, min_speech_ms
        self.model = _model()
        self.reset()

    def reset(self) -> None:
        self.model.reset_states()
        self._rest = np.zeros(0, np.float32)  # samples short of a whole window
        self.samples = 0  # samples scored so far
        self.speaking = False
        self._start = 0  # ms where the current (candidate) speech started
        self._voiced = 0  # ms of voiced windows in the candidate start
        self._silence = 0  # ms of silence since the last voiced window

    @torch.inference_mode()
    def push(self, audio: np.ndarray) -> list[tuple[str, int]]:
        """Score new float32 16 kHz mono samples; returns the ("start" | "stop", ms) transitions."""
        x = np.concatenate([self._rest, np.asarray(audio, np.float32)])
        n = len(x) // WINDOW * WINDOW
        self._rest = x[n:]
        out = []
        for w in torch.from_numpy(x[:n].copy()).view(-1, WINDOW):
            p = float(self.model(w, SAMPLE_RATE))
            t = self.samples * 1000 // SAMPLE_RATE
            self.samples += WINDOW
            if not self.speaking:
                if p >= self.threshold:
                    if self._voiced == 0:
                        self._start = t
                    self._voiced += WINDOW_MS
                    if self._voiced >= self.min_speech_ms:  # a click is not speech
                        self.speaking, self._silence = True, 0
                        out.append(("start", self._start))
                else:
                    self._voiced = 0
            elif p < self.threshold - 0.15:
                self._silence += WINDOW_MS
                if self._silence >= self.silence_ms:
                    self.speaking, self._voiced = False, 0
                    out.append(("stop", t + WINDOW_MS))
            else:
                self._silence = 0
        return out
