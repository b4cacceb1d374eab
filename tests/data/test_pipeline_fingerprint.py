"""The fingerprint of generated data names its version, so other records refuse `--resume`."""

from fedsim.data.pipeline import builtin_fingerprint


def test_generated_data_of_another_version_has_another_fingerprint() -> None:
    v2 = builtin_fingerprint("builtin:quickstart", 2000, version=2)
    v3 = builtin_fingerprint("builtin:quickstart", 2000, version=3)

    assert v2 == "builtin:quickstart:2000:1234"  # what version-2 runs recorded: they still resume
    assert v3 != v2 and v3.endswith(":v3")
    assert builtin_fingerprint("builtin:quickstart", 2001, version=3) != v3
