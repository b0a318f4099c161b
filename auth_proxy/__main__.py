"""``python -m auth_proxy`` serves the proxy; ``python -m auth_proxy keys add|list|revoke`` manages
``API_KEYS_FILE``."""

from __future__ import annotations

import argparse
import datetime
import sys

from auth_proxy.config import ProxySettings, load_proxy_settings
from auth_proxy.keys import KeyFileError, add_key, read_keys, revoke_key
from common.logs import setup_logging
from common.settings import SettingsError


def keys_command(settings: ProxySettings, args: argparse.Namespace) -> int:
    path = settings.api_keys_file
    try:
        if args.action == "add":
            key = add_key(path, args.name, admin=args.admin, rpm=args.rpm,
                          audio_seconds_per_day=args.audio_seconds_per_day)
            print(key)
            print(f"# key {args.name!r} added to {path}; it is shown only this once", file=sys.stderr)
        elif args.action == "list":
            for k in read_keys(path):
                created = datetime.datetime.fromtimestamp(k.created, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
                print(f"{k.name:20} {k.prefix}…  id={k.id}  created={created}Z  admin={k.admin}  "
                      f"rpm={k.rpm or '-'}  audio_s/day={k.audio_seconds_per_day or '-'}")
        elif args.action == "revoke":
            if not revoke_key(path, args.name):
                print(f"no key named {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"revoked {args.name!r}", file=sys.stderr)
    except KeyFileError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auth_proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the proxy (the default)")
    keys = sub.add_parser("keys", help="API keys in API_KEYS_FILE")
    ksub = keys.add_subparsers(dest="action", required=True)
    add = ksub.add_parser("add", help="create a key and print it once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may read everyone's usage")
    add.add_argument("--rpm", type=int, default=None, help="requests per minute")
    add.add_argument("--audio-seconds-per-day", type=float, default=None)
    ksub.add_parser("list")
    revoke = ksub.add_parser("revoke")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    try:
        settings = load_proxy_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "keys":
        return keys_command(settings, args)
    from auth_proxy.app import create_app
    from common.serving import run_server

    return run_server(create_app(settings), settings.auth_host, settings.auth_port,
                      header_timeout=settings.header_read_timeout)


if __name__ == "__main__":
    sys.exit(main())
