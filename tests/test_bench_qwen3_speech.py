"""`omni bench qwen3 --speech` end to end at the tiny shape: transformers' generate with audio out and our engine
speaking side by side, lengths forced equal on both sides, the per-stage profile and the JSON."""

from __future__ import annotations

import json


def test_omni_bench_qwen3_speech_runs_generate_with_audio_and_our_engine_side_by_side(tmp_path):
    from omni.cli import main

    out = tmp_path / "speech.json"
    assert main(["bench", "qwen3", "--speech", "--configs", "tiny", "--text-tokens", "6", "--speech-seconds", "0.8",
                 "--concurrency", "1,2", "--repeat", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert list(rows) == ["transformers x1", "omni engine x1", "omni engine x2"]
    frames = 10  # 0.8 s at 12.5 frames/s
    assert all(r["frames"] == frames and r["talker_text_tokens"] == 6 for r in rows.values())
    samples = frames * 1920 - 555  # one Code2Wav chunk on the reference's side, streamed exactly on ours
    assert all(abs(r["audio_s"] - samples / 24000) < 1e-9 for r in rows.values())
    ref, one = rows["transformers x1"], rows["omni engine x1"]
    assert ref["ttfa_s"] == ref["total_s"]  # the reference's wave comes at the end
    assert 0 < one["ttfa_s"] < ref["total_s"]
    assert one["ttfa_over_ref_total"] == one["ttfa_s"] / ref["total_s"] and "total_over_ref_total" in one
    assert all(r["rtf"] > 0 and r["speech_s_per_wall_s"] > 0 for r in rows.values())
    tiny = res["tiny"]
    assert tiny["codes_equal_reference"] is True  # same checkpoint, greedy, fp32: same codes
    prof = tiny["profiles"]["omni engine x1"]
    assert {"thinker decode", "talker step", "code predictor", "code2wav"} <= set(prof)
    assert prof["code predictor"]["calls"] == frames and prof["before first audio"]["code2wav"]["calls"] == 1
    assert {"thinker generate", "talker generate", "code2wav"} <= set(tiny["profiles"]["transformers x1"])
    assert [t["met"] is None for t in res["targets"]] == [False, False]  # two targets; no x8 row here
    assert res["settings"]["frames"] == frames
