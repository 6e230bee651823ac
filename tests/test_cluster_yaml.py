"""cluster.yaml: valid for Ray's autoscaler schema, closed to the internet, autoscaling from zero.

The schema is the one the installed Ray ships (``ray/autoscaler/ray-schema.json``), the same
that ``ray up`` checks, so a key Ray does not know or a resource of the wrong type fails here
instead of at launch time.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

import ray.autoscaler

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
SSH_PORT = 22
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """Ray's autoscaler config schema, from the installed ray package."""
    assert SCHEMA_PATH.is_file(), f"Ray no longer ships {SCHEMA_PATH}"
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture()
def config() -> dict[str, Any]:
    """cluster.yaml, parsed (a fresh copy per test, so tests may break it)."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every schema violation of ``config``, as ``<path>: <message>`` lines."""
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))]


def all_commands(config: dict[str, Any]) -> list[str]:
    """Every shell command of the config (global and per node type)."""
    commands = [c for key in COMMAND_KEYS for c in config.get(key) or []]
    for node_type in config["available_node_types"].values():
        commands += [c for key in COMMAND_KEYS for c in node_type.get(key) or []]
    return commands


def walk_dicts(value: Any) -> Iterator[dict]:
    """Every mapping nested anywhere in ``value``."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from walk_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_dicts(item)


def world_open_rules(config: dict[str, Any]) -> list[dict]:
    """Security-group rules (EC2 IpPermissions) open to any IPv4 or IPv6 address."""
    rules = []
    for mapping in walk_dicts(config):
        ranges = [r.get("CidrIp") for r in mapping.get("IpRanges") or []]
        ranges += [r.get("CidrIpv6") for r in mapping.get("Ipv6Ranges") or []]
        if any(cidr and ipaddress.ip_network(cidr, strict=False).prefixlen == 0 for cidr in ranges):
            rules.append(mapping)
    return rules


def gpu_node_types(config: dict[str, Any]) -> dict[str, dict]:
    """The worker node types that declare GPUs."""
    return {name: node for name, node in config["available_node_types"].items()
            if node["resources"].get("GPU", 0) > 0}


def test_cluster_yaml_passes_rays_schema(config, schema):
    assert schema_errors(config, schema) == []


def test_cluster_yaml_passes_rays_own_checks_after_defaults(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_yaml_names_the_cluster_and_provider(config):
    assert config["cluster_name"] == "semiseg"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert isinstance(config["provider"]["cache_stopped_nodes"], bool)
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["head_node_type"] in config["available_node_types"]


def test_a_fractional_gpu_resource_is_rejected(config, schema):
    config["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
    errors = schema_errors(config, schema)
    assert any(e.startswith("available_node_types/gpu_1x/resources/GPU:") and "not of type 'integer'" in e
               for e in errors), errors


def test_a_node_type_without_node_config_is_rejected(config, schema):
    del config["available_node_types"]["gpu_4x"]["node_config"]
    errors = schema_errors(config, schema)
    assert any("gpu_4x" in e and "'node_config' is a required property" in e for e in errors), errors


def test_a_config_without_provider_is_rejected(config, schema):
    del config["provider"]
    errors = schema_errors(config, schema)
    assert any("'provider' is a required property" in e for e in errors), errors


def test_a_misspelt_top_level_key_is_rejected(config, schema):
    config["max_worker"] = config.pop("max_workers")
    errors = schema_errors(config, schema)
    assert any("'max_worker' was unexpected" in e for e in errors), errors


def test_node_resources_are_integers_not_floats(config):
    for name, node in config["available_node_types"].items():
        for resource, amount in node["resources"].items():
            assert type(amount) is int, f"{name}.resources.{resource} = {amount!r}: Ray needs an integer"


def test_gpu_workers_scale_from_zero(config):
    gpus = gpu_node_types(config)
    assert gpus, "cluster.yaml declares no GPU worker type"
    assert config["head_node_type"] not in gpus, "the head should not be a GPU machine"
    for name, node in gpus.items():
        assert node.get("min_workers") == 0, f"{name} keeps GPU machines running while idle"
        assert node.get("max_workers", 0) >= 1, f"{name} can never be started"


def test_the_head_offers_no_cpu_to_trials(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0


def ports_open_to_the_internet(config: dict[str, Any]) -> list[str]:
    """Security-group rules open to any address that are not plain SSH, described."""
    return [f"{rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')}"
            for rule in world_open_rules(config)
            if (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) != ("tcp", SSH_PORT, SSH_PORT)]


def test_no_port_but_ssh_is_open_to_the_internet(config):
    assert ports_open_to_the_internet(config) == [], "reach the cluster through SSH tunnels only"
    assert "security_group" in config["provider"], "name the security group Ray creates (rules stay Ray's: 22 only)"


@pytest.mark.parametrize("rule", [
    {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    {"FromPort": 22, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
])
def test_the_port_check_catches_an_open_port(config, rule):
    config["provider"]["security_group"]["IpPermissions"] = [rule]
    assert ports_open_to_the_internet(config) != []


def test_no_command_binds_a_server_to_all_interfaces(config):
    for command in all_commands(config):
        assert not re.search(r"0\.0\.0\.0|::/0|--host[= ]+::(\s|$)", command), command


def test_the_dashboard_listens_on_the_heads_loopback(config):
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start


def test_the_head_runs_an_mlflow_server_bound_to_loopback(config):
    servers = [shlex.split(c.split("&")[0].removeprefix("nohup").strip())
               for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1, "the head must start exactly one MLflow server"
    argv = servers[0]
    host = argv[argv.index("--host") + 1]
    assert host == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5000"
    assert argv[argv.index("--backend-store-uri") + 1].startswith("sqlite:////")
    assert argv[argv.index("--artifacts-destination") + 1].startswith("s3://")
    assert not any("mlflow server" in c for c in config["worker_start_ray_commands"])


def test_all_ray_processes_use_token_authentication(config):
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert any("get-auth-token --generate" in c for c in config["head_setup_commands"])
    assert "/home/ubuntu/.ray/auth_token" in config["cluster_synced_files"], "workers need the head's token"


def test_setup_installs_torch_before_semiseg_and_builds_elasticdeform(config):
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
    semiseg_at = next(i for i, c in enumerate(commands) if "-e ~/semiseg/src" in c)
    assert torch_at < semiseg_at
    assert "--no-binary elasticdeform" in commands[semiseg_at]


def test_file_mounts_point_at_files_of_this_repository(config):
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts[{remote!r}] = {local!r} does not exist in the repository"
        assert remote == f"/home/ubuntu/semiseg/src/{Path(local).as_posix()}", (remote, local)
    assert any(c.endswith("-e ~/semiseg/src") for c in config["setup_commands"])


def test_the_shared_storage_path_is_documented(config):
    text = CLUSTER_YAML.read_text()
    assert "--storage-path s3://" in text and "--tracking-uri http://127.0.0.1:5000" in text
