"""``fedstudy operator``: its arguments, and the kopf settings it starts with."""

from __future__ import annotations

import kopf
import pytest
from fedstudy_operator import main
from fedstudy_operator.handlers import FINALIZER, configure_settings
from fedstudy_operator.options import OperatorConfig

from fedstudy.cli import main as fedstudy_main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "site", "--all-namespaces"], "--role site needs --site-name"),
        (["--role", "site", "--site-name", "Bad_Name", "-A"], "must be a DNS label"),
        (["--role", "coordinator", "--site-name", "x", "-A"], "is for --role site"),
        (["--role", "standalone"], "one of the arguments --namespace/-n --all-namespaces/-A"),
        (["-n", "research", "-A"], "not allowed with argument"),
        (["--role", "hospital", "-A"], "invalid choice"),
        (["-A", "--resync-seconds", "0"], "must be positive"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_become_the_operator_config() -> None:
    args = main.build_parser().parse_args(
        [
            "--role",
            "site",
            "--site-name",
            "cleveland",
            "-n",
            "research",
            "-n",
            "other",
            "--trainer-image",
            "registry.example/trainer:1",
            "--resync-seconds",
            "30",
        ]
    )
    config = main.config_from_args(args)
    assert config.role == "site"
    assert config.site_name == "cleveland"
    assert config.trainer_image == "registry.example/trainer:1"
    assert config.resync_seconds == 30
    assert args.namespace == ["research", "other"]
    assert args.metrics_port == 8090


def test_crd_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedstudy_main(["operator", "crd"]) == 0
    assert "kind: CustomResourceDefinition" in capsys.readouterr().out
    assert main.main(["crd", "extra"]) == 2


def test_settings_set_watch_timeouts_and_the_finalizer() -> None:
    settings = kopf.OperatorSettings()
    configure_settings(settings, OperatorConfig())
    assert settings.watching.server_timeout == 270
    assert settings.watching.client_timeout == 300
    assert settings.watching.connect_timeout == 30
    assert settings.persistence.finalizer == FINALIZER
    assert settings.peering.standalone is True
