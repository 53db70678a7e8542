"""Fetching task images: allowed sources, SSRF refusal, size and pixel limits, and settings errors."""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from backend.core.errors import MediaError
from backend.worker.media import MediaFetcher
from backend.core.settings import Settings

from bench.synthetic import png_data_uri


def _png(size=(20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_server():
    """A real HTTP server on 127.0.0.1 serving /img.png and a redirect at /redirect."""
    body = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_data_uri_and_allowed_private_host(image_server):
    """A data: URI decodes; a listed host on 127.0.0.1 is fetched only with ALLOW_PRIVATE_MEDIA."""
    fetcher = MediaFetcher(Settings(media_hosts=("127.0.0.1",), allow_private_media=True))
    assert fetcher.fetch(png_data_uri(np.zeros((4, 4, 3), np.uint8)), 1).startswith(b"\x89PNG")
    assert fetcher.fetch(f"{image_server}/img.png", 1) == _png()


@pytest.mark.parametrize(
    "settings,url,message",
    [
        (Settings(), "file:///etc/passwd", "unsupported URL scheme 'file'"),
        (Settings(), "ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        (Settings(), "{server}/img.png", "host '127.0.0.1' is not allowed; add it to MEDIA_HOSTS"),
        (Settings(media_hosts=("127.0.0.1",)), "{server}/img.png", "resolves to a private address"),
        (Settings(media_hosts=("127.0.0.1",), allow_private_media=True), "{server}/redirect", "redirects are not followed"),
        (Settings(media_hosts=("127.0.0.1",), allow_private_media=True, max_image_bytes=10), "{server}/img.png", "MAX_IMAGE_BYTES=10"),
        (Settings(media_hosts=("127.0.0.1",), allow_private_media=True, max_image_pixels=100), "{server}/img.png", "30x20 exceeds MAX_IMAGE_PIXELS=100"),
        (Settings(), "/data/upload/1/a.png", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
        (Settings(), "s3://bucket/a.png", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
        (Settings(), "data:image/png,notbase64", "base64-encoded"),
        (Settings(), "data:image/png;base64,!!!", "not valid base64"),
        (Settings(), "data:image/png;base64,aGVsbG8=", "not a decodable image"),
        (Settings(), "", "missing"),
    ],
    ids=["file", "ftp", "host-not-listed", "private-ssrf", "redirect", "too-many-bytes", "too-many-pixels",
         "upload-without-ls", "cloud-without-ls", "data-not-base64", "data-bad-base64", "data-not-image", "empty"],
)
def test_refused_media(image_server, settings, url, message):
    """Each refused or broken source raises MediaError saying why."""
    with pytest.raises(MediaError, match=message):
        MediaFetcher(settings).fetch(url.format(server=image_server), 7)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"LABEL_STUDIO_URL": "localhost:8080"}, "must start with http"),
        ({"MAX_SHOTS": "0"}, r"MAX_SHOTS='0' is not a valid value: it must be greater than or equal to 1 \(allowed"),
        ({"MAX_SHOTS": "five"}, "MAX_SHOTS='five' is not a valid value: it must be a valid integer"),
        ({"SUPPORT_POLICY": "random"}, "SUPPORT_POLICY must be"),
        ({"BASIC_AUTH_USER": "u"}, "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ({"JOB_TIMEOUT_S": "0"}, "JOB_TIMEOUT_S='0' is not a valid value: it must be greater than or equal to 1"),
        ({"TRAIN_GRAD_ACCUM": "0"}, "TRAIN_GRAD_ACCUM='0' is not a valid value: it must be greater than or equal to 1"),
        ({"TRAIN_STEPS": "-5"}, "TRAIN_STEPS='-5' is not a valid value: it must be greater than or equal to 1"),
    ],
    ids=["url-scheme", "shots-zero", "shots-not-int", "policy", "half-auth", "timeout", "grad-accum", "train-steps"],
)
def test_bad_settings(env, message):
    """Unusable environment settings fail at start with the variable named."""
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_settings_from_env_types():
    """Environment strings become typed settings."""
    s = Settings.from_env({"MAX_SHOTS": "3", "PREDICT_WAIT_S": "12.5", "ALLOW_PRIVATE_MEDIA": "yes",
                           "MEDIA_HOSTS": "a.com, B.org", "MODEL_DIR": "/tmp/x", "TRAIN_AUGMENT": "1",
                           "TRAIN_GRAD_ACCUM": "4"})
    assert (s.max_shots, s.predict_wait_s, s.allow_private_media, s.media_hosts) == (3, 12.5, True, ("a.com", "b.org"))
    assert s.train_augment is True and Settings.from_env({}).train_augment is False
    assert str(s.model_dir) == "/tmp/x" and s.train_grad_accum == 4
