"""For the egress gateway's tests: a certificate authority the test makes, an origin server that echoes.

The origin answers every path with JSON saying what it received (path, headers, body), over plain
HTTP or TLS with a certificate from the test's own CA (the ``cryptography`` package).
"""

import datetime
import ipaddress
import json
import ssl

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    """A subject or issuer name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory) -> dict:
    """A self-signed CA and a server certificate for localhost and 127.0.0.1; their paths and the CA's PEM."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("corral test CA")).issuer_name(_name("corral test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(names, critical=False).sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {**paths, "ca_pem": paths["ca"].read_text()}


def server_tls(ca: dict) -> ssl.SSLContext:
    """The origin's TLS context with the test CA's server certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ca["cert"], ca["key"])
    return context


async def _echo(request: web.Request) -> web.Response:
    """Whatever path, method: say what arrived."""
    body = await request.read()
    return web.json_response({"path": request.path_qs, "method": request.method, "headers": dict(request.headers),
                              "body": body.decode("latin-1"), "secure": request.secure})


def echo_app() -> web.Application:
    """The origin's application."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def echoed(reply: dict) -> dict:
    """The origin's JSON from an agent's fetch answer."""
    assert reply.get("status") == 200, reply
    return json.loads(reply["body"])
