"""``python -m bridge`` serves the bridge; ``python -m bridge models list|download ID|prepare ID``
manages the model store."""

from __future__ import annotations

import argparse
import logging
import sys

from bridge.config import BridgeSettings, load_settings
from bridge.models.catalog import Catalog
from bridge.models.model_store import ModelStore, ModelStoreError
from common.logs import setup_logging
from common.settings import SettingsError


def serve(settings: BridgeSettings) -> int:
    from bridge.app import create_app
    from common.serving import run_server

    return run_server(create_app(settings), settings.bridge_host, settings.bridge_port,
                      header_timeout=settings.header_read_timeout)


def models_command(settings: BridgeSettings, args: argparse.Namespace) -> int:
    catalog = Catalog.load(settings.catalog_file)
    store = ModelStore(settings.models_dir)
    if args.action == "list":
        for spec in catalog.all():
            state = "ready" if store.is_ready(spec) else "missing"
            print(f"{spec.id:32} {state:8} {spec.source:12} {','.join(spec.languages)[:40]}")
        return 0
    if args.model_id not in catalog:
        print(f"unknown model {args.model_id!r}; known: {', '.join(s.id for s in catalog.all())}",
              file=sys.stderr)
        return 2
    spec = catalog.get(args.model_id)
    try:
        if args.action == "download":
            if spec.source != "huggingface":
                store.prepare(spec)
            else:
                store.download(spec)
        elif args.action == "prepare":
            store.ensure(spec)
        elif args.action == "check":
            ready = store.is_ready(spec)
            print(f"{spec.id}: {'ready' if ready else 'missing'}")
            return 0 if ready else 1
    except ModelStoreError as exc:
        logging.getLogger("bridge.models").error("%s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the bridge (the default)")
    models = sub.add_parser("models", help="the model catalog and store (MODELS_DIR)")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="catalog entries and whether each is in MODELS_DIR")
    for action, text in (("download", "fetch a model into MODELS_DIR (resumes; verifies sizes/hashes)"),
                         ("prepare", "make a model ready: download it, or build it from its PyPI package"),
                         ("check", "exit 0 when the model is complete in MODELS_DIR, 1 when not")):
        cmd = models_sub.add_parser(action, help=text)
        cmd.add_argument("model_id")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("bridge.engine").setLevel(settings.engine_log_level.upper())
    if args.command == "models":
        return models_command(settings, args)
    catalog = Catalog.load(settings.catalog_file)
    if settings.default_model not in catalog:
        print(f"invalid setting DEFAULT_MODEL={settings.default_model!r}: not in the catalog "
              f"({', '.join(s.id for s in catalog.all())})", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
