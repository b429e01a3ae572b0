"""An application's token request, the way a workload in a pod makes it: the
real Python azure-identity ManagedIdentityCredential, through IMDS
(http://169.254.169.254, or AZURE_POD_IDENTITY_AUTHORITY_HOST when set).

usage: python3 /app/token.py SCOPE [CLIENT_ID] [--loop N] [--interval S]
                             [--show-token]

Each try prints one JSON line on stdout:
  {"ok": true, "try": 1, "ms": 41, "expires_on": 1733400000,
   "token_sha256": "<hex>", "appid": "<client ID the token names>"}
  {"ok": false, "try": 1, "ms": 12, "error": "<type>: <message>"}
`appid` is read from the token's payload without checking its signature
(absent when the token is not a JWT). `--show-token` adds the token itself
("token"), for tests that verify it.

With --loop N (1 to 100000) it makes N tries, --interval S seconds apart
(0 to 3600, default 1); every try builds a new credential, so none is
answered from the SDK's token cache and each one reaches IMDS. Exit status:
0 when every try got a token, 1 when any failed, 2 on a usage error.
"""
import sys

# This file's name is also the standard library's `token` module (which
# `tokenize`, and so `logging`, imports): drop the script's folder from the
# import path before anything else is imported, so that one is found.
# PYTHONSAFEPATH=1 (set in the image) does the same.
if sys.path and sys.path[0] and not sys.flags.safe_path:
    del sys.path[0]

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from azure.identity import ManagedIdentityCredential  # noqa: E402


def bounded(kind, low, high):
    def parse(text):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not in {low}..{high}")
        return value

    return parse


def appid_of(token):
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims.get("appid")
    except (IndexError, ValueError, AttributeError):
        return None


def attempt(scope, client_id, show_token):
    kwargs = {"client_id": client_id} if client_id else {}
    try:
        credential = ManagedIdentityCredential(**kwargs)
        try:
            token = credential.get_token(scope)
        finally:
            credential.close()
    except Exception as e:  # every failure is reported as a line
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out = {
        "ok": True,
        "expires_on": token.expires_on,
        "token_sha256": hashlib.sha256(token.token.encode()).hexdigest(),
    }
    appid = appid_of(token.token)
    if appid is not None:
        out["appid"] = appid
    if show_token:
        out["token"] = token.token
    return out


def main():
    p = argparse.ArgumentParser(prog="token.py")
    p.add_argument("scope")
    p.add_argument("client_id", nargs="?")
    p.add_argument("--loop", type=bounded(int, 1, 100000), default=1)
    p.add_argument("--interval", type=bounded(float, 0.0, 3600.0), default=1.0)
    p.add_argument("--show-token", action="store_true")
    a = p.parse_args()
    failed = 0
    for n in range(1, a.loop + 1):
        if n > 1:
            time.sleep(a.interval)
        start = time.monotonic()
        out = attempt(a.scope, a.client_id, a.show_token)
        out["try"] = n
        out["ms"] = round((time.monotonic() - start) * 1000)
        failed += not out["ok"]
        print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
