"""`omni` command line: generate (and, later, serve, caption, bench)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("omni")


class _MediaAction(argparse.Action):
    """Collect --image/--audio/--video in command-line order (that is the order the model sees)."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = list(getattr(namespace, "media", None) or [])
        items.append((self.dest, value))
        namespace.media = items


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR|embedded:NAME", help="a Qwen2.5-Omni or Qwen3-Omni checkpoint directory (the family is read "
                   "from its config.json), or embedded:qwen2.5-omni (the default) / embedded:qwen3-omni, tiny random "
                   "models this project makes")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Streaming Qwen2.5-Omni and Qwen3-Omni inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt (text, images, audio, video) and stream the reply",
                       description="Answer one prompt; the reply streams to the terminal token by token.")
    g.add_argument("prompt", nargs="?", default="", help="the user's text")
    g.add_argument("--image", action=_MediaAction, metavar="PATH", help="an image (repeatable)")
    g.add_argument("--audio", action=_MediaAction, metavar="PATH", help="an audio file (repeatable)")
    g.add_argument("--video", action=_MediaAction, metavar="PATH", help="a video file (repeatable)")
    g.add_argument("--system", help="system prompt (default: the model's own: Qwen2.5-Omni's fixed one; none for Qwen3-Omni)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--greedy", action="store_true",
                   help="nothing sampled, the same reply every run: the Thinker and the Talker always take the most "
                        "likely token (the Talker with the reference's repetition penalty 1.05, as transformers' "
                        "talker_do_sample=False), and the vocoder's noise comes from a fixed seed, so --seed changes "
                        "nothing. Without it the text and the speech codes are sampled (the checkpoint's "
                        "generation_config.json; the Talker: temperature 0.9, top-k 40, top-p 0.8)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every sampled stage: Thinker, Talker, vocoder noise (default 0; unused with --greedy)")
    g.add_argument("--use-audio-in-video", action=argparse.BooleanOptionalAction, default=None,
                   help="feed a video's sound track with its frames (default: on for videos with sound)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--speak", metavar="WAV", help="also speak the answer: write 24 kHz 16-bit WAV here "
                   "('-': raw PCM16 to stdout, text to stderr)")
    g.add_argument("--voice", help="a voice the checkpoint has (Qwen2.5-Omni: Chelsie, Ethan, default Chelsie; Qwen3-Omni: "
                   "Ethan, Chelsie, Aiden, default Ethan); an unknown one is refused with the list")
    g.add_argument("--max-audio-seconds", type=float, default=30.0, help="speech length limit (default 30)")
    g.add_argument("--max-context", type=int, default=16384, help="context limit in tokens (default 16384)")
    _add_model_args(g)
    g.set_defaults(media=[], func=cmd_generate)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub, _add_model_args)
    return parser


# Modules that add a subcommand: each has `add_parser(subparsers, add_model_args)`, kept cheap to
# import (heavy imports inside the handler), and sets `func` on its parser.
SUBCOMMANDS: list[str] = ["omni.jobs.caption", "streaming.serve_cli", "omni.bench"]


def resolve_model(path: str | None) -> Path:
    """The checkpoint to run: the given directory, or an embedded model (`embedded[:NAME]`, the default
    with no --model; built on first use)."""
    if path and not (path == "embedded" or path.startswith("embedded:")):
        return Path(path)
    from omni import embedded

    try:
        size = embedded.size_of(path or "embedded")
    except ValueError as e:
        raise UserError(str(e)) from None
    d = embedded.ensure(size=size)
    print(embedded.banner(size, d), file=sys.stderr)
    return d


def _dtype(name: str | None):
    import torch

    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cmd_generate(args) -> int:
    import asyncio

    from omni.models import load_model
    from omni.processor import MediaOptions
    from omni.sampling import GREEDY
    from omni.types import Audio, AudioDelta, Done, Error, Image, Text, TextDelta, Video
    from omni.wav import WavWriter
    from streaming.engine import Engine, EngineConfig

    parts = []
    for kind, path in args.media:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
        parts.append({"image": Image, "audio": Audio, "video": Video}[kind](path))
    if args.prompt:
        parts.append(Text(args.prompt))
    if not parts:
        raise UserError("nothing to answer: give a prompt and/or --image/--audio/--video")
    speak = args.speak is not None
    to_stdout = args.speak == "-"
    if speak and not to_stdout and not Path(args.speak).resolve().parent.is_dir():
        raise UserError(f"{args.speak}: cannot write there (no such directory)")

    t0 = time.perf_counter()
    model_dir = resolve_model(args.model)
    model = load_model(model_dir, device=args.device, dtype=_dtype(args.dtype), speech=speak,
                           options=MediaOptions(use_audio_in_video=args.use_audio_in_video))
    if speak:
        model.voice(args.voice)  # an unknown voice fails here, before any work
    t_load = time.perf_counter() - t0
    engine = Engine(model, EngineConfig(max_sessions=1, max_context=args.max_context,
                                        max_new_tokens=args.max_new_tokens,
                                        max_audio_s=args.max_audio_seconds))
    text_out = sys.stderr if to_stdout else sys.stdout
    writer = None
    token_ids, text, reasoning, done = [], [], [], None
    try:
        if speak and not to_stdout:
            try:
                writer = WavWriter(args.speak)
            except OSError as e:
                raise UserError(f"{args.speak}: cannot write ({e.strerror})") from None

        async def run():
            nonlocal done
            conv = engine.open_conversation(voice=args.voice, system=args.system)
            async for ev in conv.respond(parts, modalities=("text", "audio") if speak else ("text",),
                                         sampling=GREEDY if args.greedy else None,
                                         seed=None if args.greedy else args.seed):
                if isinstance(ev, TextDelta):
                    token_ids.append(ev.token_id)
                    (reasoning if ev.reasoning else text).append(ev.text)
                    out = sys.stderr if ev.reasoning else text_out  # a <think> block: beside the answer
                    if not args.json:
                        out.write(ev.text)
                        out.flush()
                elif isinstance(ev, AudioDelta):
                    if to_stdout:
                        sys.stdout.buffer.write(ev.pcm)
                        sys.stdout.buffer.flush()
                    else:
                        writer.write(ev.pcm)
                elif isinstance(ev, Error):
                    raise UserError(ev.message)
                elif isinstance(ev, Done):
                    done = ev

        asyncio.run(run())
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()  # never leave a half-written WAV
        engine.shutdown()
    timings = {"load_s": round(t_load, 4), **done.timings}
    if args.json:
        out = {"text": "".join(text), "token_ids": token_ids, "prompt_tokens": done.usage["prompt_tokens"],
               "finish_reason": "stop" if done.status == "completed" else "length", "model": str(model_dir),
               "timings": timings}
        if reasoning:
            out["reasoning"] = "".join(reasoning)
        if speak:
            out.update(codec_ids=done.codec_ids, audio_seconds=done.usage["audio_seconds"],
                       time_to_first_audio=timings.get("time_to_first_audio_s"))
        print(json.dumps(out), file=sys.stderr if to_stdout else sys.stdout)
    else:
        text_out.write("\n")
        log.info("timings %s", timings)
    return 0


class UserError(Exception):
    """A problem with what the user asked for: one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="omni: %(message)s")
    from omni.config import ConfigError
    from omni.media import MediaError
    from omni.pipeline import SpeechError
    from omni.tokenizer import TokenizerError
    from omni.weights import CheckpointError

    known = (UserError, MediaError, ConfigError, CheckpointError, TokenizerError, SpeechError)
    try:
        return args.func(args)
    except known as e:
        if args.debug:
            raise
        print(f"omni: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omni: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
