"""meddiff.hub: a model given as a local folder or a Hugging Face id; offline, an unknown id fails in one line."""

import pytest

from meddiff import hub
from meddiff.errors import MeddiffError
from meddiff.hub import hub_reachable, load_pretrained


class Loader:
    """Records calls; raises `error` for calls that match `fail_when`."""

    def __init__(self, error=None, fail_when=lambda name, kwargs: True):
        self.calls, self.error, self.fail_when = [], error, fail_when

    def __call__(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if self.error is not None and self.fail_when(name, kwargs):
            raise self.error
        return f"model from {name}"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_a_local_folder_is_loaded_directly(tmp_path):
    loader = Loader()
    assert load_pretrained(loader, str(tmp_path), "text encoder", subfolder="x") == f"model from {tmp_path}"
    assert loader.calls == [(str(tmp_path), {"subfolder": "x"})]  # never local_files_only: it is a path


def test_a_broken_local_folder_is_one_line(tmp_path):
    loader = Loader(OSError("no config.json in folder\nlong details"))
    with pytest.raises(MeddiffError, match=r"could not load the VAE in .*: no config.json in folder$") as info:
        load_pretrained(loader, str(tmp_path), "VAE")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["./not-here", "/abs/not-here", "~/not-here", "a/b/c"])
def test_a_path_that_does_not_exist_is_named(name):
    loader = Loader()
    with pytest.raises(MeddiffError, match="model folder .* does not exist"):
        load_pretrained(loader, name, "model")
    assert loader.calls == []


def test_a_hub_id_comes_from_the_local_cache_first(offline):
    loader = Loader()
    assert load_pretrained(loader, "org/model", "model") == "model from org/model"
    assert loader.calls == [("org/model", {"local_files_only": True})]


def test_an_uncached_id_offline_is_one_actionable_line(offline):
    loader = Loader(OSError("not cached"))
    with pytest.raises(MeddiffError, match="'org/model' is not a local folder, not in the Hugging Face cache") as info:
        load_pretrained(loader, "org/model", "model")
    assert "download it where there is internet" in str(info.value) and len(loader.calls) == 1


def test_an_uncached_id_online_is_downloaded(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    loader = Loader(OSError("not cached"), fail_when=lambda name, kwargs: kwargs.get("local_files_only", False))
    assert load_pretrained(loader, "org/model", "model") == "model from org/model"
    assert loader.calls == [("org/model", {"local_files_only": True}), ("org/model", {})]
    failing = Loader(ValueError("401 Unauthorized\nmore"))
    with pytest.raises(MeddiffError, match="could not load the model 'org/model': 401 Unauthorized$"):
        load_pretrained(failing, "org/model", "model")


def test_offline_setting_means_unreachable_without_a_connection(offline, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("HF_HUB_OFFLINE=1 must not try the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert hub_reachable() is False


def test_an_unreachable_endpoint_is_detected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hub_reachable.cache_clear()
    try:
        assert hub_reachable(timeout=1.0) is False
    finally:
        hub_reachable.cache_clear()
