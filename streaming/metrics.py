"""Server counters in the Prometheus text format (no client library: a few counters and histograms)."""

from __future__ import annotations

import threading
from collections import Counter

TTFA_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)  # seconds
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)  # compute seconds per second of speech


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum, self.count = self.sum + v, self.count + 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.sessions = 0  # open now
        self.sessions_total = 0
        self.sessions_refused = 0
        self.responses = Counter()  # by final status
        self.errors = Counter()  # error events sent, by code
        self.server_errors = Counter({"realtime": 0, "http": 0})  # failures of ours (not the client's), by API
        self.ttfa = Histogram(TTFA_BUCKETS)
        self.ttft = Histogram(TTFA_BUCKETS)
        self.rtf = Histogram(RTF_BUCKETS)

    def session_opened(self) -> None:
        with self.lock:
            self.sessions += 1
            self.sessions_total += 1

    def session_closed(self) -> None:
        with self.lock:
            self.sessions -= 1

    def refused(self) -> None:
        with self.lock:
            self.sessions_refused += 1

    def error(self, code: str | None) -> None:
        with self.lock:
            self.errors[code or "unknown"] += 1

    def server_error(self, api: str) -> None:
        """A fault of ours answered as server_error (its traceback is in the log)."""
        with self.lock:
            self.server_errors[api] += 1

    def response_done(self, status: str, timings: dict, usage: dict) -> None:
        with self.lock:
            self.responses[status] += 1
            if timings.get("time_to_first_token_s") is not None:
                self.ttft.observe(timings["time_to_first_token_s"])
            if timings.get("time_to_first_audio_s") is not None:
                self.ttfa.observe(timings["time_to_first_audio_s"])
            if usage.get("audio_seconds") and timings.get("total_s"):
                self.rtf.observe(timings["total_s"] / usage["audio_seconds"])

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE omni_sessions gauge", f"omni_sessions {self.sessions}",
                     "# TYPE omni_sessions_total counter", f"omni_sessions_total {self.sessions_total}",
                     "# TYPE omni_sessions_refused_total counter", f"omni_sessions_refused_total {self.sessions_refused}",
                     "# TYPE omni_responses_total counter"]
            lines += [f'omni_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())]
            lines.append("# TYPE omni_errors_total counter")
            lines += [f'omni_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
            lines += ["# HELP omni_server_errors_total failures of ours, not the client's (tracebacks in the log)",
                      "# TYPE omni_server_errors_total counter"]
            lines += [f'omni_server_errors_total{{api="{a}"}} {n}' for a, n in sorted(self.server_errors.items())]
            for name, h, what in (("omni_time_to_first_audio_seconds", self.ttfa, "response.create to first audio"),
                                  ("omni_time_to_first_token_seconds", self.ttft, "response.create to first token"),
                                  ("omni_speech_real_time_factor", self.rtf, "response seconds per second of speech")):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"] + h.lines(name)
            return "\n".join(lines) + "\n"


def engine_metrics(stats: dict) -> str:
    """The engine's placement and busy time per stage (Engine.stats()), Prometheus text: which stage saturates,
    on which worker."""
    lines = ["# HELP omni_engine_workers the engine's worker threads (the speech worker's included)",
             "# TYPE omni_engine_workers gauge", f"omni_engine_workers {len(stats['workers'])}",
             "# HELP omni_engine_worker_info a worker: its device, torch threads and stages",
             "# TYPE omni_engine_worker_info gauge"]
    lines += [f'omni_engine_worker_info{{worker="{w["worker"]}",device="{w["device"]}",threads="{w["threads"]}",'
              f'stages="{",".join(w["stages"])}"}} 1' for w in stats["workers"]]
    lines += ["# HELP omni_engine_stage_busy_seconds_total seconds a stage spent computing, by worker",
              "# TYPE omni_engine_stage_busy_seconds_total counter"]
    lines += [f'omni_engine_stage_busy_seconds_total{{stage="{b["stage"]}",worker="{b["worker"]}"}} {b["s"]:.6f}'
              for b in stats["busy"]]
    lines += ["# HELP omni_engine_speech_queue_codes codec codes sent to the speech decoder and not taken in yet",
              "# TYPE omni_engine_speech_queue_codes gauge", f"omni_engine_speech_queue_codes {stats['speech_queue_codes']}",
              "# HELP omni_engine_speaking replies whose speech is being made",
              "# TYPE omni_engine_speaking gauge", f"omni_engine_speaking {stats['speaking']}"]
    return "\n".join(lines) + "\n"
