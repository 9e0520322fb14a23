"""The lifecycle base class: typed plugin config whose errors name the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmcached.extensions.lifecycle import (
    PluginBase,
    PluginConfig,
    PluginConfigError,
    PluginContext,
    PluginType,
    typed_config,
)


@dataclass
class ExampleConfig(PluginConfig):
    url: str
    retries: int = 3
    ratio: float = 0.5
    mode: Literal["fast", "safe"] = "safe"
    kind: PluginType = PluginType.OTHER
    hosts: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    label: str | None = None
    verbose: bool = False


class ExamplePlugin(PluginBase):
    config_class = ExampleConfig

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.started = 0

    def on_startup(self):
        self.started += 1

    def get_metrics(self):
        return {"started": self.started}


def test_valid_options_become_a_typed_dataclass():
    cfg = typed_config(
        ExampleConfig,
        {"url": "x://", "ratio": 1, "mode": "fast", "kind": "KV_CACHE", "ports": [1, 2]},
        "ex",
    )
    assert cfg == ExampleConfig(
        url="x://", ratio=1.0, mode="fast", kind=PluginType.KV_CACHE, ports=[1, 2]
    )
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize(
    ("options", "field_name", "message"),
    [
        ({}, "url", "is required"),
        ({"url": 5}, "url", "expected a string"),
        ({"url": "u", "retries": True}, "retries", "expected an integer"),
        ({"url": "u", "ratio": "half"}, "ratio", "expected a number"),
        ({"url": "u", "mode": "slow"}, "mode", "expected one of ['fast', 'safe']"),
        ({"url": "u", "kind": "GPU"}, "kind", "expected one of ['KV_CACHE'"),
        ({"url": "u", "ports": [1, "2"]}, "ports[1]", "expected an integer"),
        ({"url": "u", "hosts": "a"}, "hosts", "expected a list"),
        ({"url": "u", "label": 3}, "label", "expected a string"),
        ({"url": "u", "verbose": "yes"}, "verbose", "expected true or false"),
        ({"url": "u", "colour": 1}, "colour", "unknown option; known options: hosts, kind"),
    ],
)
def test_errors_name_the_field(options, field_name, message):
    with pytest.raises(PluginConfigError) as info:
        typed_config(ExampleConfig, options, "ex")
    assert info.value.field == field_name
    assert message in info.value.message
    assert str(info.value).startswith(f"ex: {field_name}: ")


def test_plugin_base_validates_in_init_and_reports_metrics():
    plugin = ExamplePlugin({"url": "u"}, PluginContext(name="mine", worker_id=2))
    assert plugin.config.url == "u" and plugin.context.worker_id == 2
    plugin.on_startup()
    assert plugin.get_metrics() == {"started": 1}
    plugin.on_shutdown()
    with pytest.raises(PluginConfigError, match="mine: url: is required"):
        ExamplePlugin({}, PluginContext(name="mine"))
