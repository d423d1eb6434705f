"""The command line: every operation an operator needs, on the same key store the server uses.

    main       the parser and the exit statuses
    common     settings, the store, the audit record of a CLI action, output helpers
    serve      serve (and --dev), check-config, demo, bench
    keys       list, show, create, import, rotate and every other state change, import-bulk
    genesys    register a key with the platform
    backup     create, verify, restore encrypted bundles
    hawk       the platform's Hawk credentials
    audit      verify the audit trail's hash chain
"""

from __future__ import annotations

from lkm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
