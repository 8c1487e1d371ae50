"""URL weight sources: a web page where weights were expected is refused, and nothing is kept."""

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from factorizer_cli.errors import DownloadError
from factorizer_cli.zoo.download import download_url


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def web(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "folder.html").write_text("<html><body>Google Drive folder: sign in</body></html>")
    (root / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_web_page_is_refused_and_nothing_is_written(web, tmp_path):
    destination = tmp_path / "cache" / "best_metric_model.pth"
    with pytest.raises(DownloadError, match="sent a web page, not the weights.*models import"):
        download_url(f"{web}/folder.html", destination)
    assert not destination.exists() and not destination.with_name(destination.name + ".part").exists()


def test_a_binary_file_is_downloaded(web, tmp_path):
    destination = tmp_path / "cache" / "weights.bin"
    assert download_url(f"{web}/weights.bin", destination).read_bytes() == b"\x00\x01" * 1000
