"""dinobatch serve's options refused before anything loads."""

from __future__ import annotations

from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_CONFIG


def test_the_review_queue_is_refused_on_a_network_address(tmp_path, tiny_model):
    """The review page hands its token to whoever loads it: served on 0.0.0.0, anyone who can reach the
    port could post and apply decisions. Refused (exit 3) with the way to reach it instead."""
    queue = tmp_path / "queue"
    queue.mkdir()
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model), "--queue", str(queue),
                                      "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "loopback address only" in result.output and "ssh -L" in result.output
