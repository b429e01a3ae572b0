"""Gets a token the way an application in a pod does, with the real Python
azure-identity ManagedIdentityCredential, and prints the outcome as one JSON line.

The IMDS endpoint comes from AZURE_POD_IDENTITY_AUTHORITY_HOST when set (the
SDK's own switch; it then skips its probe), else http://169.254.169.254.

usage: imds_token.py SCOPE [--client-id ID | --resource-id ID | --object-id ID]
exit 0 with {"token", "expires_on"} or exit 1 with {"error_type", "error"}.
"""
import argparse
import json
import sys

from azure.identity import ManagedIdentityCredential


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scope")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--client-id")
    g.add_argument("--resource-id")
    g.add_argument("--object-id")
    a = p.parse_args()
    kwargs = {}
    if a.client_id:
        kwargs["client_id"] = a.client_id
    elif a.resource_id:
        kwargs["identity_config"] = {"resource_id": a.resource_id}
    elif a.object_id:
        kwargs["identity_config"] = {"object_id": a.object_id}
    try:
        tok = ManagedIdentityCredential(**kwargs).get_token(a.scope)
    except Exception as e:  # report any failure to the Rust test as data
        print(json.dumps({"error_type": type(e).__name__, "error": str(e)}))
        return 1
    print(json.dumps({"token": tok.token, "expires_on": tok.expires_on}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
