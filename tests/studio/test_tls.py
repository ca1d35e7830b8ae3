"""`lcm-live serve --ssl-certfile/--ssl-keyfile`: the studio over https and wss (what a phone on the LAN needs
for the camera), with a self-signed certificate made here by openssl; the origin check and the token cookie
follow the scheme."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from lcm_live.cli import main

from .conftest import TOKEN
from .test_uvicorn_server import Server, _get, next_final, next_message, params

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian: apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
                    str(keyfile), "-out", str(certfile), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(certfile))
    return certfile, keyfile, context


def test_the_studio_over_https_and_wss(tmp_path, cert):
    certfile, keyfile, context = cert
    srv = Server(tmp_path, {}, "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile), token=TOKEN,
                 tls=context)
    try:
        assert f"open https://127.0.0.1:{srv.port}/?token=" in srv.log()
        assert _get(srv.base + "/healthz", context=context)[0] == 200
        # The token link sets the cookie Secure: the browser never sends it over plain http.
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                             _NoRedirect())
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(f"{srv.base}/?token={TOKEN}", timeout=5)
        cookie = redirect.value.headers["set-cookie"]
        assert redirect.value.code == 303 and "Secure" in cookie and "HttpOnly" in cookie

        async def go():
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with connect(srv.ws_url, ssl=context, origin=f"https://127.0.0.1:{srv.port}",
                               additional_headers=headers) as ws:
                await next_message(ws, "hello")
                await ws.send(params(prompt="over tls", num_inference_steps=1))
                assert (await next_final(ws))["params"]["prompt"] == "over tls"
            with pytest.raises(InvalidStatus) as refused:  # the page's origin must be https too
                async with connect(srv.ws_url, ssl=context, origin=f"http://127.0.0.1:{srv.port}",
                                   additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403

        asyncio.run(go())
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_tls_files_are_checked_before_starting(tmp_path, cert, capsys):
    certfile, _, _ = cert
    assert main(["serve", "--ssl-certfile", str(certfile)]) == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err
    assert main(["serve", "--ssl-certfile", str(certfile), "--ssl-keyfile", str(tmp_path / "missing.pem")]) == 2
    err = capsys.readouterr().err
    assert f"--ssl-keyfile {tmp_path / 'missing.pem'}: no readable file there" in err and "openssl req" in err
