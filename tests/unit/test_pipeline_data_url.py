"""Training data by https:// URL (what a Kubeflow dashboard run can reach: e.g. an object store's
presigned URL), fetched from a real local HTTPS server with its own certificate."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading

import pytest

from pipelines.core import data


@pytest.fixture(scope="module")
def https_root(tmp_path_factory):
    """Serve a folder over HTTPS on 127.0.0.1 with a self-signed certificate trusted via SSL_CERT_FILE."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    root = tmp_path_factory.mktemp("https")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    mp = pytest.MonkeyPatch()
    mp.setenv("SSL_CERT_FILE", str(cert))
    yield root, f"https://127.0.0.1:{httpd.server_address[1]}"
    mp.undo()
    httpd.shutdown()


def test_a_https_csv_trains_like_a_local_one_and_no_credential_is_recorded(https_root):
    root, base = https_root
    local = data.load_dataset().head(120)
    local.to_csv(root / "t.csv", index=False)
    df = data.load_dataset(f"{base}/t.csv?X-Amz-Signature=secret", "target")
    assert df.shape == local.shape and list(df.columns) == list(local.columns)
    assert df.attrs["source"] == f"{base}/t.csv"  # the presigned query (a credential) is dropped


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://bucket/t.csv", "only https:// URLs are fetched"),
        ("http://127.0.0.1:9/t.csv", "only https:// URLs are fetched"),
        ("https://127.0.0.1:9/t.json", "must end in .csv or .parquet"),
    ],
)
def test_url_refusals_name_the_fix(url, message):
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(url)


def test_a_missing_url_is_one_line(https_root):
    _, base = https_root
    with pytest.raises(
        data.DataError, match=r"^cannot download 'https://127\.0\.0\.1:\d+/nope\.csv': HTTP 404 "
    ):
        data.load_dataset(f"{base}/nope.csv")
