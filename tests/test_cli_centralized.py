"""`fedsim run CONFIG --centralized`: the centralized baseline of an experiment, from the CLI."""

from fedsim.cli import build_parser, next_commands, resume_command


def test_centralized_is_kept_in_the_commands_that_continue_the_run(tmp_path) -> None:
    args = build_parser().parse_args(
        ["run", "experiments/quickstart.yaml", "--centralized", "--set", "run.rounds=4"]
    )

    assert args.centralized
    assert resume_command(args) == (
        "fedsim run experiments/quickstart.yaml --set run.rounds=4 --centralized --resume"
    )
    shown = next_commands(args, tmp_path / "quickstart_centralized", 4)
    assert "--set run.rounds=14 --centralized --resume" in shown


def test_a_federated_run_does_not_become_centralized() -> None:
    args = build_parser().parse_args(["run", "experiments/quickstart.yaml"])

    assert not args.centralized
    assert "--centralized" not in resume_command(args)
