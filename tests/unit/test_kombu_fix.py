"""The kombu patch is installed only on the kombu it was written for."""

from __future__ import annotations

import pytest
from kombu.transport import redis as kombu_redis

from genq.worker import kombu_fix


def test_the_installed_kombu_is_the_one_the_patch_was_written_for() -> None:
    version = kombu_fix.kombu_version()
    assert kombu_fix.is_supported(version), (
        f"kombu {version} is outside {kombu_fix.supported_range()}: "
        "reinstall with constraints.txt, or update workers/kombu_fix.py"
    )


@pytest.mark.parametrize(
    ("version", "supported"),
    [("5.7.0", True), ("5.7.3", True), ("5.7.1rc2", True), ("5.6", False), ("5.8.0", False), ("6.0", False)],
)
def test_supported_range(version: str, supported: bool) -> None:
    assert kombu_fix.is_supported(version) is supported


@pytest.fixture
def uninstalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if no install() had run in this process; the original method comes back afterwards."""
    monkeypatch.setattr(kombu_fix, "_installed", False)
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", kombu_redis.Channel._connparams)
    monkeypatch.delenv(kombu_fix.ESCAPE_HATCH, raising=False)


@pytest.mark.usefixtures("uninstalled")
def test_install_refuses_an_unknown_kombu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kombu.__version__", "5.8.0")
    before = kombu_redis.Channel._connparams
    with pytest.raises(RuntimeError, match=r">=5\.7,<5\.8.*kombu 5\.8\.0 is installed.*GENQ_KOMBU_FIX=off"):
        kombu_fix.install()
    assert kombu_redis.Channel._connparams is before


@pytest.mark.usefixtures("uninstalled")
def test_the_escape_hatch_skips_the_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kombu.__version__", "6.0.0")
    monkeypatch.setenv(kombu_fix.ESCAPE_HATCH, "off")
    before = kombu_redis.Channel._connparams
    kombu_fix.install()
    assert kombu_redis.Channel._connparams is before


@pytest.mark.usefixtures("uninstalled")
def test_install_patches_a_supported_kombu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kombu.__version__", "5.7.0")
    before = kombu_redis.Channel._connparams
    kombu_fix.install()
    assert kombu_redis.Channel._connparams is not before
