import pytest

from fedsim.data.profiles import ClientProfile, load_profiles
from fedsim.errors import FedsimInputError

PROFILE = """
classes:
  phone: {availability: 0.3, lora_rank: 2}
  laptop: {availability: 0.8}
default: laptop
clients:
  0: phone
  2: {class: phone, lora_rank: 1}
  3: {availability: 0.1}
"""


def test_classes_defaults_and_overrides(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE)
    profiles = load_profiles(path, num_clients=5, max_rank=8)
    assert profiles == [
        ClientProfile(0.3, 2),
        ClientProfile(0.8, None),
        ClientProfile(0.3, 1),
        ClientProfile(0.1, None),
        ClientProfile(0.8, None),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients: {9: {availability: 0.5}}", r"clients.9: no such client"),
        ("clients: {1: tablet}", r"clients.1: unknown class 'tablet'"),
        ("clients: {1: {lora_rank: 16}}", r"clients.1.lora_rank: expected an integer in 1..8"),
        ("default: {availability: 1.5}", r"default.availability: expected a value in \[0, 1\]"),
        ("clients: {1: {cpu: 3}}", r"clients.1: unknown key 'cpu'"),
        ("clients: {1: {speed: 0}}", r"clients.1.speed: expected a number > 0"),
        ("classes: {x: {dropout: 2}}", r"classes.x.dropout: expected a value in \[0, 1\]"),
        ("devices: {}", "expected a mapping with classes, default and clients"),
    ],
)
def test_bad_profiles_name_the_entry(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(FedsimInputError, match=message):
        load_profiles(path, num_clients=5, max_rank=8)


def test_device_fields_fall_back_field_by_field(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(
        "classes: {phone: {speed: 0.2, bandwidth_mbps: 5, dropout: 0.3}}\n"
        "default: {speed: 1.5}\n"
        "clients: {1: phone, 2: {class: phone, speed: 0.1}, 3: {dropout: 0.5}}\n"
    )
    profiles = load_profiles(path, num_clients=4, max_rank=8)
    assert profiles[0] == ClientProfile(speed=1.5)
    assert profiles[1] == ClientProfile(speed=0.2, bandwidth_mbps=5.0, dropout=0.3)
    assert profiles[2] == ClientProfile(speed=0.1, bandwidth_mbps=5.0, dropout=0.3)
    assert profiles[3] == ClientProfile(speed=1.5, dropout=0.5)


def test_missing_profile_file(tmp_path):
    with pytest.raises(FedsimInputError, match=r"client.profile: .* not found"):
        load_profiles(tmp_path / "nope.yaml", 3, 8)


def test_bad_profile_fails_the_run_before_anything_is_written(experiment_file, tmp_path, capsys):
    from fedsim.cli import main

    profile = tmp_path / "profile.yaml"
    profile.write_text("clients: {1: {lora_rank: 99}}\n")
    config = experiment_file(client={"profile": str(profile)})
    assert main(["run", str(config)]) == 2
    assert "clients.1.lora_rank: expected an integer in 1..4" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
