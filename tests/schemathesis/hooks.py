"""Authentication for schemathesis runs against credgate (tests/api/ecosystem.rs).

Every test case gets a credential that works when it is sent. schemathesis is free to
revoke, roll or narrow the credential it was given (the API allows a credential to do so to
itself), so before each case the current pair is checked with `/auth/verify` and, when it no
longer works, a new one is minted with `credgate issue` and registered like any client would.
"""

import json
import os
import subprocess
import urllib.error
import urllib.request

import schemathesis

BASE = os.environ["CREDGATE_URL"]
BINARY = os.environ["CREDGATE_BIN"]
KEY_FILE = os.environ["CREDGATE_MASTER_KEY_FILE"]


def _status(request):
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _works(pair):
    request = urllib.request.Request(
        f"{BASE}/auth/verify?scope=*",
        headers={"X-Api-Key": pair["api_key"], "X-Api-Secret": pair["api_secret"]},
    )
    return _status(request) in (200, 204)


def _register_new():
    minted = subprocess.run(
        [BINARY, "issue", "--master-key-file", KEY_FILE, "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    pair = json.loads(minted.stdout)
    request = urllib.request.Request(
        f"{BASE}/credentials",
        data=json.dumps(pair).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    status = _status(request)
    if status != 201:
        raise RuntimeError(f"registering a fresh credential answered {status}")
    return pair


@schemathesis.auth(refresh_interval=None)
class FreshCredential:
    pair = None
    minted = 0

    def get(self, case, ctx):
        if FreshCredential.pair is None or not _works(FreshCredential.pair):
            FreshCredential.pair = _register_new()
            FreshCredential.minted += 1
        return FreshCredential.pair

    def set(self, case, data, ctx):
        case.headers = case.headers or {}
        case.headers["X-Api-Key"] = data["api_key"]
        case.headers["X-Api-Secret"] = data["api_secret"]
