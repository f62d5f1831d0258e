"""The start-up checks of `whatslike.settings`: weak secrets are refused, with one line
naming the setting and never its value."""

from __future__ import annotations

from pathlib import Path

import pytest

from whatslike.errors import ConfigError
from whatslike.settings import (
    MIN_JWT_SECRET_CHARS,
    MIN_SECRET_CHARS,
    check_safety,
    load_settings,
)

#: A production-like process: PostgreSQL and Kafka, secrets of its own.
PRODUCTION = {
    "roles": "api,router,connector,status-worker",
    "database_url": "postgresql://nobody@127.0.0.1:1/none",
    "bus_url": "kafka://127.0.0.1:1",
    "meta_app_secret": "app-secret-of-this-deployment",
    "meta_verify_token": "verify-token-of-this-deployment",
    "meta_access_token": "access-token-of-this-deployment",
    "jwt_secret": "j" * MIN_JWT_SECRET_CHARS,
}


def test_a_production_like_layout_with_strong_secrets_starts(tmp_path: Path) -> None:
    check_safety(load_settings(data_dir=tmp_path, **PRODUCTION))
    # Unset, the optional ones mean "none": a generated JWT secret, no token asked.
    check_safety(load_settings(data_dir=tmp_path, **{**PRODUCTION, "jwt_secret": ""}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("meta_verify_token", ""),  # anyone could complete Meta's handshake
        ("meta_verify_token", "v"),
        ("meta_app_secret", ""),
        ("meta_app_secret", "s" * (MIN_SECRET_CHARS - 1)),
        ("meta_access_token", "a"),
        ("meta_previous_app_secrets", "old"),
        ("jwt_secret", "j"),
        ("jwt_secret", "j" * (MIN_JWT_SECRET_CHARS - 1)),
        ("metrics_token", "m"),
        ("sim_control_token", "c" * (MIN_SECRET_CHARS - 1)),
    ],
)
def test_a_weak_secret_is_refused_with_one_line_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    settings = load_settings(data_dir=tmp_path, **{**PRODUCTION, name: value})
    with pytest.raises(ConfigError) as refused:
        check_safety(settings)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith(f"invalid setting {name} (WHATSLIKE_{name.upper()}): ")
    assert f"at least {MIN_SECRET_CHARS if name != 'jwt_secret' else MIN_JWT_SECRET_CHARS}" in line
    assert not value or f"{value!r}" not in line


def test_the_development_mode_keeps_its_published_secrets(tmp_path: Path) -> None:
    check_safety(load_settings(data_dir=tmp_path, jwt_secret="short"))


@pytest.mark.parametrize(("replicas", "in_sync"), [(1, 1), (2, 2), (3, 2), (5, 3)])
def test_kafka_topics_need_a_majority_of_their_replicas_in_sync_by_default(
    replicas: int, in_sync: int
) -> None:
    settings = load_settings(kafka_replication_factor=replicas)
    assert settings.effective_min_insync_replicas == in_sync
    chosen = load_settings(kafka_replication_factor=replicas, kafka_min_insync_replicas=1)
    assert chosen.effective_min_insync_replicas == 1


def test_more_replicas_in_sync_than_there_are_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"kafka_min_insync_replicas .*REPLICATION_FACTOR \(3\)"):
        load_settings(kafka_replication_factor=3, kafka_min_insync_replicas=4)
