"""A client reads only its share of a daemon's config file, and imports none of the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmcached import config as config_mod
from lmcached.client import Client, Retry
from lmcached.client import settings as client_settings
from lmcached.errors import ConfigError

SERVER_PACKAGES = (
    "lmcached.storage",
    "lmcached.extensions",
    "lmcached.supervision",
    "lmcached.codecs",
    "lmcached.daemon",
)

CLIENT_SCRIPT = """
import json, sys
from lmcached.client import Client

with Client.from_config(sys.argv[1], timeout=10) as c:
    c.put([b"settings-k"], [b"v" * 1000])
    got = c.get([b"settings-k"])[0]
print(json.dumps({"value_len": len(bytes(got)), "modules": sorted(sys.modules)}))
"""


def test_from_config_in_a_fresh_process_imports_no_server_code(shared_daemon):
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, str(shared_daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["value_len"] == 1000
    leaked = [m for m in result["modules"] if m.startswith(SERVER_PACKAGES)]
    assert leaked == [], f"a client process imported server code: {leaked}"


@pytest.mark.parametrize(
    "values,env",
    [
        ({}, {}),
        ({"instance_name": "blue"}, {}),
        ({"runtime_dir": "~/rt", "request_timeout": 3}, {}),
        ({"runtime_dir": "/tmp/a"}, {"LMCACHED_RUNTIME_DIR": "/tmp/b"}),
        ({}, {"LMCACHED_INSTANCE_NAME": "green", "LMCACHED_REQUEST_TIMEOUT": "2.5"}),
        ({"curve_client_key_file": "c.key_secret", "curve_server_key_file": "s.key"}, {}),
    ],
)
def test_client_settings_find_the_same_instance_folder_as_the_daemon(tmp_path, values, env):
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump({"num_workers": 3, "chunk_size": 16, **values}))
    full = config_mod.load(path, environ=env)
    mine = client_settings.load(path, environ=env)
    assert mine.instance_dir == full.instance_dir
    assert mine.request_timeout == full.request_timeout
    assert mine.curve_client_key_file == full.curve_client_key_file
    assert mine.curve_server_key_file == full.curve_server_key_file


def test_client_settings_name_the_bad_key(tmp_path):
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump({"request_timeout": -1}))
    with pytest.raises(ConfigError, match="request_timeout"):
        client_settings.load(path, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        client_settings.load(tmp_path / "missing.yaml", environ={})


def test_from_config_takes_its_default_deadline_from_request_timeout(tmp_path: Path):
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump({"request_timeout": 4}))
    with Client.from_config(path) as c:
        assert c.timeout == 4.0
    with Client.from_config(path, timeout=1.5) as c:
        assert c.timeout == 1.5


def test_retry_policy_is_a_value_and_refuses_nonsense():
    assert Retry() == Retry(resends=1, probe_interval=0.25, map_timeout=0.5)
    with pytest.raises(ValueError, match="resends"):
        Retry(resends=-1)
    with pytest.raises(ValueError, match="map_timeout"):
        Retry(map_timeout=0)
