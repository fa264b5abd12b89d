"""The `sidpipe` command.

    sidpipe study serve results/human_study/<study> [--host 127.0.0.1] [--port 8000]
                        [--responses FILE] [--url-prefix /path] [--threads 8]

serves a built human study (rule `human_study`) to its participants; see README "The human
study (paper App. B)". Imports stay light: the server needs Flask and waitress, never torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidpipe.io import SidpipeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidpipe", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    study = commands.add_parser("study", help="the human study (paper App. B)")
    study_commands = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    serve = study_commands.add_parser(
        "serve",
        help="serve a built study to participants",
        description="Serve a built study: each participant opens <url>/p/<participant id> "
        "(ids in <study>/site/participants.csv); every answer is appended to the responses "
        "file as it is given.",
    )
    serve.add_argument("directory", help="the study folder, results/human_study/<study>")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
        "network, over plain HTTP: prefer a TLS reverse proxy or an SSH tunnel)",
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    serve.add_argument(
        "--responses",
        default=None,
        help="the responses file (default <directory>/responses.jsonl)",
    )
    serve.add_argument(
        "--url-prefix",
        default="",
        help="path the study lives under behind a reverse proxy (e.g. /study)",
    )
    serve.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "study" and args.study_command == "serve":
        from sidpipe.human_study.server import serve

        try:
            serve(
                args.directory,
                host=args.host,
                port=args.port,
                responses=args.responses,
                url_prefix=args.url_prefix,
                threads=args.threads,
            )
        except SidpipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
