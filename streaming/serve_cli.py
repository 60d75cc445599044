"""`omni serve`'s command line: its flags, kept apart from streaming/server.py so that building the `omni` parser
(every command, `--help` included) does not import the server, the engine or the protocol schemas (the `openai`
package's types, ~2 s). The handler imports streaming.server when the command runs."""

from __future__ import annotations

import os


def _cmd_serve(args) -> int:
    from streaming.server import cmd_serve

    return cmd_serve(args)


def add_parser(subparsers, add_model_args) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI Realtime websocket API, chat completions and the web demo on one port",
        description="Serve GET /v1/realtime (OpenAI Realtime protocol, GA and beta, plus input_image_buffer.append "
                    "video frames), POST /v1/chat/completions, GET /v1/models, /healthz, /metrics and the web demo "
                    "at /.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"),
                   help="require this key (Authorization: Bearer); default $OMNI_API_KEY, else no key")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (engine slots), default 8")
    p.add_argument("--max-context", type=int, default=8192, help="tokens per session, history included")
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit in text tokens (default 512)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0,
                   help="speech length limit per reply (default 30); a reply cut there ends 'incomplete'")
    p.add_argument("--greedy", action="store_true",
                   help="default to no sampling: the same text and speech for the same input every time "
                        "(requests that set temperature/top_p still sample)")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds without client messages before closing")
    p.add_argument("--modalities", choices=["text", "audio"], nargs="+",
                   help="default output modalities (default: audio when the model can speak, else text)")
    p.add_argument("--no-ui", dest="ui", action="store_false", help="do not serve the web demo at /")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="HTTP request body limit in MB (bigger: 413), default 64")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let HTTP callers give http(s) media URLs for the server to fetch (default: refused)")
    p.add_argument("--media-root", metavar="DIR",
                   help="let HTTP callers name local media files (file:// or paths) under this directory only")
    r = p.add_argument_group("scaling out on Ray Serve (pip install -e '.[ray]'; see README \"Scaling out\")")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: several replicas, each the whole app with its own engine (one per "
                        "GPU with --device cuda); without --address a local Ray is started on this machine")
    r.add_argument("--address", metavar="HOST:PORT|auto",
                   help="with --ray: join this Ray cluster (auto: the one `ray start` began on this node); "
                        "default: start a local one on this machine (its HTTP proxy on --host)")
    r.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the app (default 1)")
    r.add_argument("--autoscale", metavar="MIN:MAX",
                   help="with --ray: let Serve scale between MIN and MAX replicas by ongoing sessions instead of "
                        "a fixed --replicas")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads of the engine's workers on the CPU (default: the machine's cores); with "
                        "--ray: per replica, and as many Ray CPUs (default 1)")
    e = p.add_argument_group("engine placement")
    e.add_argument("--speech-worker", choices=["auto", "on", "off"], default="auto",
                   help="run the speech decoder (Token2Wav / Code2Wav) on a worker of its own beside the "
                        "Thinker/Talker worker (auto, the default: on with --device cuda, off on the CPU, where "
                        "the two workers contend for Python's GIL; see /metrics for the busy time per stage)")
    e.add_argument("--speech-threads", type=int, default=None,
                   help="with the speech worker on the CPU: its share of --threads (default half)")
    e.add_argument("--speech-device", metavar="DEVICE",
                   help="with the speech worker: its device, e.g. cuda:1 (default: the model's; on CUDA its own "
                        "stream)")
    add_model_args(p)
    p.set_defaults(func=_cmd_serve)
