"""Settings in blocks (settings.gateway, .s3, .ray, .stages), read from the same flat LLMSHIP_*
variables as before the blocks: a deployment's environment keeps working unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmship.settings import GatewaySettings, Settings

# Every variable a stack process is given (llmship.stack.child_env, less the secrets), named
# as before the blocks.
ENV_NAMES = """
LLMSHIP_APPROVAL_POLL_INTERVAL_S LLMSHIP_ARTIFACTS_BUCKET LLMSHIP_BUILD_SLOT_TIMEOUT_S
LLMSHIP_CALIBRATION_DATA_DIR LLMSHIP_DEVICE LLMSHIP_DISK_HEADROOM LLMSHIP_GATEWAY_BODY_TIMEOUT_S
LLMSHIP_GATEWAY_DOWN_AFTER LLMSHIP_GATEWAY_ENDPOINT_REFRESH_S LLMSHIP_GATEWAY_FLEET_WAIT_S
LLMSHIP_GATEWAY_HEADER_TIMEOUT_S LLMSHIP_GATEWAY_HEALTH_INTERVAL_S
LLMSHIP_GATEWAY_MAX_CHOICES_PER_REQUEST LLMSHIP_GATEWAY_MAX_HEADER_BYTES
LLMSHIP_GATEWAY_MAX_IN_FLIGHT LLMSHIP_GATEWAY_MAX_REQUEST_BYTES LLMSHIP_GATEWAY_PORT
LLMSHIP_GATEWAY_SEEN_WITHIN_S LLMSHIP_GATEWAY_SEND_TIMEOUT_S LLMSHIP_GATEWAY_SHADOW_CONCURRENCY
LLMSHIP_GATEWAY_SHADOW_KEPT_PAIRS LLMSHIP_GATEWAY_SHADOW_MAX_BYTES LLMSHIP_GATEWAY_SHADOW_QUEUE
LLMSHIP_GATEWAY_SHADOW_TIMEOUT_S LLMSHIP_GPU_WORK_POOL LLMSHIP_HOST LLMSHIP_HOURLY_USD
LLMSHIP_KEEP_EVALUATED_SERVER_S LLMSHIP_MIRROR_BUCKET LLMSHIP_PREFECT_PORT
LLMSHIP_QUANTIZE_PYTHON LLMSHIP_RAY_COMPILE_CACHES LLMSHIP_RAY_NUM_CPUS LLMSHIP_RAY_PORT
LLMSHIP_RAY_STREAM_WEIGHTS
LLMSHIP_ROLLOUT_CHECK_INTERVAL_S
LLMSHIP_RUN_HEARTBEAT_S LLMSHIP_S3_IDENTITY LLMSHIP_S3_MAX_CONCURRENCY LLMSHIP_S3_PART_MIB
LLMSHIP_S3_PORT LLMSHIP_S3_REGION LLMSHIP_SERVER_HOLD_LEASE_S LLMSHIP_SERVER_START_TIMEOUT_S
LLMSHIP_SERVE_PYTHON LLMSHIP_SERVING_SLOT_LEASE_S LLMSHIP_SERVING_SLOT_TIMEOUT_S
LLMSHIP_STATE_DIR LLMSHIP_TRTLLM_PYTHON LLMSHIP_WORK_POOL
""".split()
# Unset by default, so absent above; set, they travel under these names.
OPTIONAL_ENV_NAMES = """
LLMSHIP_ALERT_WEBHOOK_URL LLMSHIP_NODE_CACHE_DIR LLMSHIP_PROMETHEUS_SD_FILE_PATH
LLMSHIP_RAY_ADDRESS LLMSHIP_S3_ENDPOINT_URL LLMSHIP_TRTLLM_BIN_DIR
""".split()


@pytest.fixture()
def env(monkeypatch, tmp_path):
    """An environment with no LLMSHIP_* variable but a state folder of the test's own (no
    credentials file in it unless the test writes one)."""
    for name in list(os.environ):
        if name.startswith("LLMSHIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    return monkeypatch


def test_flat_variables_land_in_their_blocks(env, tmp_path):
    env.setenv("LLMSHIP_GATEWAY_MAX_IN_FLIGHT", "7")
    env.setenv("LLMSHIP_GATEWAY_PORT", "8123")
    env.setenv("LLMSHIP_ARTIFACTS_BUCKET", "x")
    env.setenv("LLMSHIP_MIRROR_BUCKET", "m")
    env.setenv("LLMSHIP_S3_PORT", "9333")
    env.setenv("LLMSHIP_RAY_ADDRESS", "10.0.0.1:6379")
    env.setenv("LLMSHIP_NODE_CACHE_DIR", str(tmp_path / "nvme"))
    env.setenv("LLMSHIP_SERVE_PYTHON", "/opt/serve/bin/python")
    env.setenv("LLMSHIP_DISK_HEADROOM", "1.5")
    settings = Settings()
    assert settings.gateway.max_in_flight == 7
    assert settings.gateway_url == "http://127.0.0.1:8123"
    assert settings.s3.artifacts_bucket == "x" and settings.s3.mirror_bucket == "m"
    assert settings.s3_url == "http://127.0.0.1:9333"
    assert settings.ray.address == "10.0.0.1:6379"
    assert settings.node_cache == tmp_path / "nvme"
    assert settings.stages.serve_python == Path("/opt/serve/bin/python")
    assert settings.stages.disk_headroom == 1.5
    # What is not set keeps its default.
    assert settings.gateway.max_request_bytes == 4 * 1024 * 1024
    assert settings.ray.port == 6379


def test_a_block_given_in_python_keeps_the_environment_for_the_fields_it_does_not_name(env):
    env.setenv("LLMSHIP_GATEWAY_MAX_IN_FLIGHT", "7")
    settings = Settings(gateway={"port": 8001})
    assert (settings.gateway.port, settings.gateway.max_in_flight) == (8001, 7)
    assert Settings(gateway=GatewaySettings(port=8002)).gateway.port == 8002


def test_a_refused_value_names_its_setting_and_echoes_no_secret(env):
    env.setenv("LLMSHIP_GATEWAY_MAX_IN_FLIGHT", "0")
    env.setenv("LLMSHIP_S3_PORT", "not-a-port")
    env.setenv("LLMSHIP_S3_SECRET_KEY", "the-secret-key-value")
    env.setenv("LLMSHIP_GATEWAY_ADMIN_TOKEN", "the-admin-token-value")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "gateway.max_in_flight" in message and "greater than or equal to 1" in message
    assert "s3.port" in message
    assert "the-secret-key-value" not in message and "the-admin-token-value" not in message
    assert "not-a-port" not in message


def test_a_misspelt_block_field_is_refused_without_echoing_the_block(env):
    with pytest.raises(ValidationError) as refused:
        Settings(s3={"secret_key": "the-secret-key-value", "part_mb": 8})
    assert "s3.part_mb" in str(refused.value)
    assert "the-secret-key-value" not in str(refused.value)


def test_a_setting_by_its_flat_name_is_refused_not_ignored(env):
    """Settings(gateway_port=...) set the port before the blocks; now ignored, it would leave
    the default in place without a word."""
    with pytest.raises(ValidationError, match=r"gateway_port \(now gateway\.port\)"):
        Settings(gateway_port=8001)


def test_the_credentials_file_fills_the_store_keys_and_the_admin_token(env, tmp_path):
    (tmp_path / "credentials.json").write_text(
        json.dumps(
            {
                "s3_access_key": "writer-key",
                "s3_secret_key": "writer-secret",
                "s3_read_access_key": "reader-key",
                "s3_read_secret_key": "reader-secret",
                "gateway_admin_token": "token-from-file",
            }
        )
    )
    writer = Settings()
    assert (writer.s3.access_key, writer.s3.secret_key) == ("writer-key", "writer-secret")
    assert writer.gateway.admin_token == "token-from-file"
    env.setenv("LLMSHIP_S3_IDENTITY", "reader")
    env.setenv("LLMSHIP_GATEWAY_ADMIN_TOKEN", "token-from-env")
    reader = Settings()
    assert (reader.s3.access_key, reader.s3.secret_key) == ("reader-key", "reader-secret")
    assert reader.gateway.admin_token == "token-from-env"


def test_a_process_started_with_the_stacks_environment_reads_the_same_settings(env, tmp_path):
    """llmship.stack.child_env: every setting travels under its flat name, and reads back."""
    from llmship.stack import child_env

    env.setenv("LLMSHIP_GATEWAY_MAX_IN_FLIGHT", "7")
    env.setenv("LLMSHIP_ARTIFACTS_BUCKET", "x")
    env.setenv("LLMSHIP_NODE_CACHE_DIR", str(tmp_path / "nvme"))
    env.setenv("LLMSHIP_RAY_ADDRESS", "10.0.0.1:6379")
    env.setenv("LLMSHIP_HOURLY_USD", '{"H100": 2.99, "cpu": 0.2}')
    # A secret travels in the credentials file, never in the environment.
    settings = Settings(s3={"secret_key": "the-secret-key-value"})
    given = {k: v for k, v in child_env(settings).items() if k.startswith("LLMSHIP_")}
    assert (
        set(ENV_NAMES)
        <= set(given)
        <= set(ENV_NAMES) | set(OPTIONAL_ENV_NAMES) | {"LLMSHIP_REPO_ROOT"}
    )
    assert "the-secret-key-value" not in given.values()
    for name in list(os.environ):
        if name.startswith("LLMSHIP_"):
            env.delenv(name)
    for name, value in given.items():
        env.setenv(name, value)
    again = Settings()
    assert again.model_dump(exclude={"s3": {"secret_key"}}) == settings.model_dump(
        exclude={"s3": {"secret_key"}}
    )
