"""Which Ray a run joins (trainers/ray_train.py: `stopped_head`, `init_ray`): the head `ray start` last
recorded on this machine, unless nothing answers there any more (then a local instance, said in one
line, instead of ~15 minutes of ray.init retrying a stopped head); a head on 127.0.0.1 is joined
there, not at the machine's network address; $RAY_ADDRESS always wins. No Ray
is started here: the record is a file, the head a listening socket or none."""

import socket

import pytest

import trainers.ray_train
from trainers.ray_train import init_ray, stopped_head


@pytest.fixture
def record(tmp_path, monkeypatch):
    """Writes Ray's record of the current head (`<RAY_TMPDIR>/ray/ray_current_cluster`) in a folder of the test's."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()

    def write(address: str) -> None:
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    return write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_heads_record_is_passed_over(record, monkeypatch, capsys):
    assert stopped_head() is None  # nothing recorded: ray.init's own choice (a local instance)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    record(address)
    assert stopped_head() == address
    calls = []
    monkeypatch.setattr(trainers.ray_train.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(trainers.ray_train.ray, "init", lambda **kw: calls.append(kw))
    init_ray()
    assert calls == [{"address": "local"}]
    assert f"the Ray head recorded on this machine ({address}) does not answer" in capsys.readouterr().out
    assert stopped_head() is None  # the stale record is gone (Ray's state API reads it too)
    monkeypatch.setenv("RAY_ADDRESS", address)  # an address the user gave is the preflight's to probe, not passed over
    assert stopped_head() is None


def test_a_running_heads_record_is_joined(record, monkeypatch):
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        record(f"127.0.0.1:{head.getsockname()[1]}")
        assert stopped_head() is None
        calls = []
        monkeypatch.setattr(trainers.ray_train.ray, "is_initialized", lambda: False)
        monkeypatch.setattr(trainers.ray_train.ray, "init", lambda **kw: calls.append(kw))
        monkeypatch.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", True)
        init_ray()
        assert calls == [{"address": None}]
        # that head listens on loopback only (`make services`): Ray must not swap 127.0.0.1 for the
        # machine's network address, where nothing answers
        from ray._private import ray_constants, services

        assert ray_constants.ENABLE_RAY_CLUSTER is False and services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"


def test_a_head_on_a_network_address_is_joined_as_ray_would(record, monkeypatch):
    record("192.0.2.77:6379")  # a `ray start --head` without --node-ip-address records the machine's address
    monkeypatch.setattr(trainers.ray_train, "stopped_head", lambda: None)
    monkeypatch.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(trainers.ray_train.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(trainers.ray_train.ray, "init", lambda **kw: None)
    init_ray()
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is True
