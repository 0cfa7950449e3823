"""The deployment files in deploy/ pass the validators this machine has (issue 13).

nginx -t for the balancer config, systemd-analyze verify for the unit, the Kubernetes schemas
(kubernetes-validate, offline) for the manifests; each skips with the reason when its tool is absent.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_kit import NGINX

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's package)")
def test_nginx_conf_passes_nginx_t(tmp_path):
    temps = " ".join(f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = tmp_path / "main.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{ access_log off; {temps} include {DEPLOY / 'nginx.conf'}; }}\n")
    done = subprocess.run([NGINX, "-t", "-c", str(main), "-p", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and "test is successful" in done.stderr, done.stderr


def test_nginx_conf_hashes_header_then_cookie_then_query():
    conf = (DEPLOY / "nginx.conf").read_text()
    order = [m.group(1) for m in re.finditer(r"\$(http_x_session_id|cookie_corral_session|arg_session_id)", conf)]
    assert list(dict.fromkeys(order)) == ["http_x_session_id", "cookie_corral_session", "arg_session_id"]
    assert re.search(r"hash \$corral_session_key consistent;", conf)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = (DEPLOY / "corral.service").read_text()
    assert re.search(r"(?m)^Delegate=yes$", unit)
    corral = Path(sys.executable).with_name("corral")  # the unit's ExecStart must exist for verify
    (tmp_path / "corral.service").write_text(unit.replace("/opt/corral/bin/corral", str(corral)))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "corral.service")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_kubernetes_manifests_match_the_schemas():
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[deploy]')")
    import yaml

    kinds = set()
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            validate.validate(doc, validate.latest_version(), strict=True)
            kinds.add(doc["kind"])
    assert {"StatefulSet", "Service", "Ingress"} <= kinds


def test_containerfile_copies_what_exists():
    text = (DEPLOY / "Containerfile").read_text()
    for line in re.findall(r"(?m)^COPY (.+)$", text):
        *sources, _dest = line.split()
        assert all((ROOT / s).exists() for s in sources), line
    assert 'ENTRYPOINT ["corral", "serve"]' in text and "CORRAL_HOST=0.0.0.0" in text
