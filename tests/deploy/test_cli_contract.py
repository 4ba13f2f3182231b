"""Every `moemesh` command line and environment that Compose and the Kubernetes overlays give a container is
one the real CLI parser and the services' settings accept."""

import pytest

from moemesh import cli
from moemesh.settings import from_flags
from tests.deploy.manifests import K8S, OVERLAYS, compose_containers, k8s_containers, k8s_objects, plan_overlay

OTHER_ENV = {"POD_IP"}  # read by Kubernetes itself ($(POD_IP) in MOEMESH_ADVERTISE)
OTHER_PREFIXES = ("OTEL_",)  # OpenTelemetry's own variables (moemesh.tracing)


def containers(tmp_path_factory):
    found = compose_containers()
    for overlay in OVERLAYS:
        found += k8s_containers(k8s_objects(K8S / "overlays" / overlay), overlay)
    plan = plan_overlay(tmp_path_factory.mktemp("overlay") / "plan")
    return found + k8s_containers(k8s_objects(plan), "plan")


@pytest.mark.timeout(60)
def test_every_container_command_and_env_is_accepted(tmp_path_factory, monkeypatch):
    found = containers(tmp_path_factory)
    roles = {c.argv[0] for c in found}
    assert roles == {"gateway", "router", "expert", "health"}
    for container in found:
        args = cli._parser().parse_args(container.argv)  # exits (SystemExit) on an unknown flag or value
        if args.command not in cli.SERVICES:
            assert not container.env, container.where
            continue
        settings_cls = cli.settings_class(args.command)
        known = {f"MOEMESH_{name.upper()}" for name in settings_cls.model_fields}
        for name, value in container.env.items():
            if name.startswith(OTHER_PREFIXES) or name in OTHER_ENV:
                continue
            assert name in known, f"{container.where}: {name} is no setting of `moemesh {args.command}`"
            monkeypatch.setenv(name, value or "x")  # valueFrom: a placeholder of the right type for these fields
        from_flags(settings_cls, args)  # validates the values: types, choices, TLS files going together
        for name in container.env:
            monkeypatch.delenv(name, raising=False)
