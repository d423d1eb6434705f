"""The options of `lkm bench`, apart from the code that runs them so that `lkm --help` stays fast."""

from __future__ import annotations

import argparse
import os

DEFAULT_DEV_JSON = "lkm-dev/dev.json"
PADDING_NAMES = ("oaep-sha1", "pkcs1", "oaep-sha256")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("load", "startup", "suite"), default="load",
                   help="load (default): drive a running server; startup: start-up and footprint with many keys; "
                        "suite: every measurement of the README's table, against servers started for it")
    target = p.add_argument_group("target (default: the dev server's dev.json)")
    target.add_argument("--dev-json", default=None, help=f"facts of a --dev server (default: {DEFAULT_DEV_JSON})")
    target.add_argument("--url", help="the route's URL: the platform decrypt URL, or the native base URL")
    target.add_argument("--native-url", help="native API base URL, to fetch the key's public key")
    target.add_argument("--ca", help="CA certificate file that signed the server's certificate")
    target.add_argument("--cert", help="client certificate (native API)")
    target.add_argument("--key", help="client private key (native API)")
    target.add_argument("--hawk-id", help="Hawk credential id (platform route)")
    target.add_argument("--hawk-key-file", help="file holding the Hawk key")
    target.add_argument("--key-id", help="key to unwrap with (default: the newest active key)")
    target.add_argument("--public-key", help="its public key (base64 DER PKCS#1 or PEM) instead of asking the server")
    target.add_argument("--server-pid", type=int,
                        help="the server's process id: report its CPU per unwrap (all its processes and threads, "
                             "from /proc), by thread, against the raw private operation's CPU")

    load = p.add_argument_group("load")
    load.add_argument("--route", choices=("platform", "native", "batch"), default="platform")
    load.add_argument("--padding", choices=PADDING_NAMES, default="oaep-sha1")
    load.add_argument("--concurrency", type=int, default=16,
                      help="connections, each with one request in flight (default: %(default)s); suite: for "
                           "each server process")
    load.add_argument("--duration", type=float, default=10.0, help="seconds measured (default: %(default)s)")
    load.add_argument("--requests", type=int, help="measure this many requests instead of a duration")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default: %(default)s)")
    load.add_argument("--rate", type=float, help="requests per second at fixed intervals (default: closed loop)")
    load.add_argument("--batch-size", type=int, default=100, help="items per batch request (default: %(default)s)")
    load.add_argument("--new-connections", action="store_true",
                      help="a fresh TLS connection per request (the cost of clients that do not keep alive)")
    load.add_argument("--resume", action="store_true", help="with --new-connections: resume the TLS session")
    load.add_argument("--verify-every", type=int, default=10, help="check every n-th plaintext (default: 10)")

    modes = p.add_argument_group("modes")
    modes.add_argument("--raw", action="store_true", help="the private-key operation in process, no server")
    modes.add_argument("--compare", action="store_true",
                       help="raw, then the server, then the server at --latency-at of its peak; ratio server/raw")
    modes.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                       help="threads for --raw (default: the number of CPUs, %(default)s)")
    modes.add_argument("--rounds", type=int, default=None,
                       help="with --compare (default 1) and suite (default 3): measure raw and server this many "
                            "times and compare the medians; within a round they alternate in slices of about a "
                            "second (on a shared or virtual machine, neighbours' load moves single runs by 10%% "
                            "or more)")
    modes.add_argument("--floor", action="store_true",
                       help="with --compare: also measure the leanest Python endpoint that unwraps (no "
                            "authentication, audit, metrics or logs) on the server's key store, each round")
    modes.add_argument("--latency-at", type=float, default=0.8,
                       help="with --compare: fraction of the peak for the latency run (0: skip)")
    modes.add_argument("--project-cores", type=int, default=16,
                       help="project the server's rate to a machine with this many cores (default: %(default)s)")
    modes.add_argument("--keys", type=int, default=5000, help="startup: keys in the synthetic store")
    modes.add_argument("--dev-dir", default="lkm-dev", help="suite: dev environment to use (made if missing)")
    modes.add_argument("--json", action="store_true", help="print the report as JSON")
