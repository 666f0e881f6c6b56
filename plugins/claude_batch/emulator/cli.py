"""``claude-batch-emulator``: run the emulator as a server process.

    claude-batch-emulator --host 127.0.0.1 --port 0 --api-key sk-emulator \
        --time-scale 60 --processing-seconds 300 --fault create:429:0.1 --cache-hit-rate 0.8

Prints ``claude-batch-emulator listening on http://HOST:PORT`` once the port is bound (port 0
picks a free one), then serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

import uvicorn

from .app import create_app
from .faults import FaultConfig, HttpFault
from .server import bind_listening_socket, build_store, quiet_intentional_cuts


def _latency(spec: str) -> tuple[str, float]:
    endpoint, _, seconds = spec.rpartition(":")
    if not endpoint:
        raise argparse.ArgumentTypeError(f"bad latency {spec!r}; expected ENDPOINT:SECONDS")
    return endpoint, float(seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="claude-batch-emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--api-key", default="sk-emulator", help="the key clients must send")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="emulated seconds per wall-clock second"
    )
    parser.add_argument("--processing-seconds", type=float, default=60.0, help="emulated time a batch takes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-hit-rate", type=float, default=0.9)
    parser.add_argument("--max-requests-per-batch", type=int, default=100_000)
    parser.add_argument("--max-body-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--max-queued-requests", type=int, default=None)
    parser.add_argument("--batch-requests-per-minute", type=int, default=None)
    parser.add_argument(
        "--public-base-url", default=None, help="base of results_url (default: as the client called)"
    )
    parser.add_argument(
        "--no-precompute-results",
        action="store_true",
        help="make result lines when downloaded, not in the background from the batch's creation on",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="ENDPOINT:STATUS[:RATE[:TIMES]]",
        help="HTTP fault, repeatable, e.g. create:429:0.5 or results:500:1:2",
    )
    parser.add_argument("--latency", action="append", default=[], type=_latency, metavar="ENDPOINT:SECONDS")
    parser.add_argument("--batch-errored-rate", type=float, default=0.0)
    parser.add_argument("--batch-expired-rate", type=float, default=0.0)
    parser.add_argument("--batch-stall-rate", type=float, default=0.0)
    parser.add_argument("--results-cut-after", type=int, default=None, metavar="LINES")
    parser.add_argument("--results-cut-fraction", type=float, default=None)
    parser.add_argument("--faults-json", default=None, help="the whole fault config as JSON (see faults.py)")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def faults_from_args(args: argparse.Namespace) -> dict:
    faults = json.loads(args.faults_json) if args.faults_json else {}
    faults.setdefault("http", []).extend(HttpFault.from_spec(spec).to_dict() for spec in args.fault)
    faults.setdefault("latency", {}).update(dict(args.latency))
    batch = faults.setdefault("batch", {})
    for key, value in (
        ("errored_rate", args.batch_errored_rate),
        ("expired_rate", args.batch_expired_rate),
        ("stall_rate", args.batch_stall_rate),
    ):
        if value:
            batch[key] = value
    if args.results_cut_after is not None or args.results_cut_fraction is not None:
        faults["results_cut"] = {"after_lines": args.results_cut_after, "fraction": args.results_cut_fraction}
    FaultConfig.from_dict(faults)  # fail fast on a bad spec
    return faults


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        store = build_store(
            time_scale=args.time_scale,
            processing_seconds=args.processing_seconds,
            seed=args.seed,
            responder=None,
            faults=faults_from_args(args),
            config={
                "cache_hit_rate": args.cache_hit_rate,
                "max_requests_per_batch": args.max_requests_per_batch,
                "max_body_bytes": args.max_body_bytes,
                "max_queued_requests": args.max_queued_requests,
                "batch_requests_per_minute": args.batch_requests_per_minute,
                "public_base_url": args.public_base_url,
                "precompute_results": not args.no_precompute_results,
            },
        )
    except (ValueError, KeyError) as error:
        print(f"claude-batch-emulator: {error}", file=sys.stderr)
        return 2
    sock = bind_listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"claude-batch-emulator listening on http://{host}:{port}", flush=True)
    quiet_intentional_cuts()
    config = uvicorn.Config(
        create_app(store, args.api_key), log_level=args.log_level, access_log=False, lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
