"""``mtor models list|pull|verify|path|rm`` — the model manager's command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.common import EXIT_FAILURE, EXIT_OK, Command, environ
from daemon.config import Config

if TYPE_CHECKING:
    from daemon.modelstore import ModelStore


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    help_text = "list, download, verify and remove models (models/manifest.yaml)"
    models = sub.add_parser("models", help=help_text, description=help_text, parents=[common])
    models.add_argument(
        "--models-dir",
        metavar="DIR",
        help="models directory (default: $MTOR_MODELS_DIR, /var/lib/mtor/models, ./models)",
    )
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="every model of the manifest and whether it is here")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    pull = actions.add_parser("pull", help="download (resumable) or install, then verify")
    pull.add_argument("names", nargs="+", metavar="NAME", help="models to fetch (mtor models list)")
    pull.add_argument("--force", action="store_true", help="fetch again even if present")
    ver = actions.add_parser("verify", help="check sha256 (default: every present model)")
    ver.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: all)")
    path = actions.add_parser("path", help="print the model file's path (exit 1 if absent)")
    path.add_argument("name", metavar="NAME", help="the model")
    rm = actions.add_parser("rm", help="delete a downloaded model and any partial download")
    rm.add_argument("names", nargs="+", metavar="NAME", help="models to delete")
    return {"models": cmd_models}


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    from daemon.modelstore import ModelError, ModelStore

    configured = args.models_dir or _configured_dir(config)
    store = ModelStore.default(configured, environ())
    try:
        handler = {
            "list": _list,
            "pull": _pull,
            "verify": _verify,
            "path": _path,
            "rm": _rm,
        }[args.models_command]
        return handler(store, args)
    except ModelError as exc:
        print(f"mtor models: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _configured_dir(config: Config) -> Path | None:
    # A top-level `models: {dir: ...}` section, when the config has one.
    section = getattr(config, "models", None)
    value = getattr(section, "dir", None)
    return Path(value) if value else None


def _list(store: ModelStore, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in store.names():
        st = store.status(name)
        entry = st.entry
        state = "present" if st.present else ("partial" if st.partial_bytes else "missing")
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "state": state,
                "size": entry.size,
                "source": entry.source.type,
                "license": entry.license,
                "languages": entry.languages,
                "sha256": entry.sha256,
                "path": str(st.path) if st.path else None,
            }
        )
    if args.json:
        print(json.dumps({"models_dir": str(store.dir), "models": rows}, indent=2))
        return EXIT_OK
    print(f"models directory: {store.dir}")
    print(f"{'NAME':<28} {'KIND':<7} {'STATE':<8} {'SIZE':>9} {'SOURCE':<6} LICENSE")
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "?"
        print(
            f"{r['name']:<28} {r['kind']:<7} {r['state']:<8} {size:>9} {r['source']:<6} "
            f"{r['license']}"
        )
    return EXIT_OK


def _pull(store: ModelStore, args: argparse.Namespace) -> int:
    from daemon.modelstore import ProgressBar

    for name in args.names:
        bar = ProgressBar(name)
        try:
            path = store.pull(name, bar, force=args.force)
        finally:
            bar.close()
        print(path)
    return EXIT_OK


def _verify(store: ModelStore, args: argparse.Namespace) -> int:
    names = args.names or [n for n in store.names() if store.status(n).present]
    failed = 0
    for name in names:
        result = store.verify(name)
        if result.expected is None:
            print(f"{name}: sha256 {result.actual} (no checksum known to compare with)")
        elif result.ok:
            origin = " (recorded at pull)" if result.recorded else ""
            print(f"{name}: OK{origin}")
        else:
            failed += 1
            print(
                f"{name}: MISMATCH expected {result.expected} got {result.actual} ({result.path})"
            )
    return EXIT_FAILURE if failed else EXIT_OK


def _path(store: ModelStore, args: argparse.Namespace) -> int:
    print(store.path(args.name))
    return EXIT_OK


def _rm(store: ModelStore, args: argparse.Namespace) -> int:
    for name in args.names:
        removed = store.rm(name)
        if removed:
            for p in removed:
                print(f"removed {p}")
        else:
            print(f"{name}: nothing to remove")
    return EXIT_OK
