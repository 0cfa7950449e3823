"""A hostile agent for the network: tries the host's services directly, listens where the host's clients
connect, and goes out through the egress gateway (urllib, httpx, aiohttp, raw CONNECT, no token).

``attack`` answers {"escaped": bool, "detail": ...} like hostile.Escaper; ``fetch`` answers what a
client library got through the gateway ({"status", "body"} or {"error"}).
"""

import asyncio
import base64
import os
import socket
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlsplit

# Imported here, in the zygote: a sandboxed agent may not be able to read the installation to import
# them later (docs/security.md).
import aiohttp
import httpx

from corral.agent_proc.demo import DemoAgent


class NetworkProbe(DemoAgent):
    """A demo agent plus the network attacks and the gateway's clients."""

    def cmd_attack(self, args):
        """Run the attack named ``args["what"]``."""
        try:
            detail = getattr(self, "_" + args["what"])(args)
        except OSError as exc:
            return {"escaped": False, "detail": f"{type(exc).__name__}: {exc}"}
        return {"escaped": True, "detail": detail}

    def _tcp(self, args):
        """Connect straight to host:port (the database, corral's port, the metadata address)."""
        with socket.create_connection((args["host"], int(args["port"])), timeout=3):
            return f"connected to {args['host']}:{args['port']}"

    def _listen(self, args):
        """Listen on host:port and wait for one client (one of the host's, sending its Authorization)."""
        family = socket.AF_INET6 if ":" in args["host"] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args["host"], int(args["port"])))
            sock.listen(1)
            sock.settimeout(float(args.get("wait", 2)))
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                raise OSError("listened, but no client of the host's came") from None
            with conn:
                return conn.recv(4096).decode("latin-1")

    def cmd_env(self, args):
        """The proxy and upstream variables this agent was given."""
        return {k: v for k, v in os.environ.items() if "PROXY" in k.upper() or k.startswith("CORRAL_UPSTREAM_")}

    def cmd_fetch(self, args):
        """GET (or POST ``data``) a URL with ``client`` (urllib, httpx, aiohttp: each honours the proxy variables)."""
        try:
            return getattr(self, "_fetch_" + args.get("client", "urllib"))(args)
        except Exception as exc:  # every failure is the answer
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _fetch_urllib(self, args):
        """urllib: ProxyHandler from the environment."""
        data = args["data"].encode() if "data" in args else None
        request = urllib.request.Request(args["url"], data=data, headers=args.get("headers", {}))
        context = _tls(args)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return {"status": response.status, "body": response.read().decode()}
        except urllib.error.HTTPError as exc:
            return {"status": exc.code, "body": exc.read().decode()}

    def _fetch_httpx(self, args):
        """httpx (the openai SDK's client): trust_env is its default."""
        verify = _tls(args) or True
        with httpx.Client(timeout=10, verify=verify) as client:
            response = client.get(args["url"], headers=args.get("headers", {}))
            return {"status": response.status_code, "body": response.text}

    def _fetch_aiohttp(self, args):
        """aiohttp with trust_env=True."""
        async def get():
            async with aiohttp.ClientSession(trust_env=True) as http:
                async with http.get(args["url"], headers=args.get("headers", {}), ssl=_tls(args)) as response:
                    return {"status": response.status, "body": await response.text()}

        return asyncio.run(get())

    def cmd_raw(self, args):
        """Send ``request`` (text, with {token} filled in from the proxy URL) to the gateway; its answer's first line and body."""
        proxy = urlsplit(os.environ["HTTP_PROXY"])
        text = args["request"].replace("{auth}", base64.b64encode(f"corral:{proxy.password}".encode()).decode())
        with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as sock:
            sock.sendall(text.encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
                if args.get("first_bytes") and len(answer) >= int(args["first_bytes"]):
                    break
        head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
        return {"status_line": head.split("\r\n")[0], "head": head, "body": body}


def _tls(args):
    """A TLS context trusting the test's CA (given as PEM text), or None."""
    if not args.get("ca_pem"):
        return None
    return ssl.create_default_context(cadata=args["ca_pem"])
