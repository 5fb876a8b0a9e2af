"""What the agent does not import (issue 11: an idle agent <= 40 MB PSS with 100 enrolled pods): each of these cost
it memory for code it never runs. ``python -m agent run``'s import graph is loaded in a fresh interpreter, which
then parses the agent's command line and reads a certificate, as the agent does at start."""

from __future__ import annotations

import json
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hbone import WorkloadCertificate
from tests.fixtures.repo import REPO

NOT_IMPORTED = {
    # 7.4 MiB of PSS: keys, CSRs and chain checks are made in a worker process (agent.identity.worker), and
    # certificates read with hbone.der
    "cryptography": "agent.identity.x509ops runs in its worker process",
    # its own writer replaced it: 2.4 MiB for its HTTP server, push gateway and the stdlib they import
    "prometheus_client": "agent.telemetry.exposition writes the metrics",
    "http.server": "prometheus_client's HTTP server", "urllib.request": "prometheus_client's push gateway",
    "wsgiref": "prometheus_client's WSGI app", "http.client": "urllib.request's",
    # 2 MiB with email (its parser, beside the email.utils cryptography uses), zipfile and csv, for one version
    "importlib.metadata": "the version is agent.__version__", "zipfile": "importlib.metadata's",
    "email.parser": "importlib.metadata's and http.client's",
    # ~0.5 MiB: only tests fork processes into namespaces
    "multiprocessing": "agent.capture.netns imports it where it forks",
    # 0.4 MiB: argparse asks shutil for the terminal's width, and shutil imports bz2 and lzma
    "shutil": "agent.__main__ gives argparse the width", "bz2": "shutil's", "lzma": "shutil's",
    # ~9 MB in the lab (its C core's pages, its Python modules, seven threads): the Observer's server and the CA's
    # client speak gRPC with agent.rpc, on h2
    "grpc": "agent.rpc serves the Observer and asks the CA",
    # datetime.strptime's module
    "_strptime": "hbone.der reads validity times digit by digit",
}

PROBE = """
import json, sys
before = set(sys.modules)
import agent.__main__
agent.__main__.parse_args(["run", "--node", "n", "--state", "s", "--ca", "ca:15012", "--ca-token", "t",
                           "--trust-bundle", "b"])
from hbone.der import CertificateFields
CertificateFields.parse(bytes.fromhex(sys.stdin.read()))
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_agent_imports_none_of_what_it_does_not_run(client_cert: WorkloadCertificate) -> None:
    # what the interpreter loaded before (site hooks of the machine, e.g. a .pth importing certifi) is not the
    # agent's doing
    der = x509.load_pem_x509_certificate(client_cert.chain_pem).public_bytes(Encoding.DER)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, input=der.hex(), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    modules = json.loads(out)
    assert "agent.node.agent" in modules and "agent.telemetry.exposition" in modules  # the probe sees the agent
    found = {m: why for m, why in NOT_IMPORTED.items() if any(x == m or x.startswith(f"{m}.") for x in modules)}
    assert found == {}, f"the agent imports {sorted(found)}"
