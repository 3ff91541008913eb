import socket
import urllib.request

import pytest

from tests.offline_guard import NetworkAccessInTests


def test_a_download_fails_loudly():
    with pytest.raises(NetworkAccessInTests):
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=5)


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket()
    client.connect(server.getsockname())  # must not raise
    client.close()
    server.close()
