"""engines.ray_common's address parsing: which host and port are tried before ray.init (nothing there: a
ConfigError at once instead of minutes in ray.init)."""

from __future__ import annotations

import socket

import pytest

from dinobatch.engines.ray_common import _check_reachable, gcs_endpoint
from dinobatch.errors import ConfigError


@pytest.mark.parametrize("address, endpoint", [
    (None, None), ("local", None), ("auto", None),  # Ray resolves these itself
    ("10.0.0.5:6379", ("10.0.0.5", 6379)), ("head.example:6380", ("head.example", 6380)),
    ("[::1]:6379", ("::1", 6379)), ("ray://head:10002", ("head", 10002)), ("ray://head", ("head", 10001)),
    ("head", None),  # no port: left to ray.init's own message
])
def test_the_endpoint_tried_for_each_address_form(address, endpoint):
    assert gcs_endpoint(address) == endpoint


def test_nothing_listening_is_a_config_error_naming_the_address():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port} \(--address or RAY_ADDRESS\)"):
        _check_reachable(f"127.0.0.1:{port}")


def test_a_listening_address_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
