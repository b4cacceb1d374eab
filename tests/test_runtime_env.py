"""What `ray job submit --working-dir . --runtime-env runtime_env.yaml` uploads: the project,
never its secrets. Packaged with Ray's own function, as the job client does."""

import zipfile
from pathlib import Path

import yaml
from ray._private.runtime_env.packaging import create_package

ROOT = Path(__file__).parents[1]
SECRETS = [
    ".env",
    ".env.local",
    "prod.env",
    "experiments/.env",
    ".envrc",
    "keys/server.key",
    "keys/cert.pem",
    "keys/client.p12",
    ".ssh/id_rsa",
    "id_ed25519.pub",
    ".netrc",
    ".aws/credentials",
    ".ray/auth_token",
    "judge_credentials.json",
    "openai_secret.txt",
]
KEPT = ["fedsim/__init__.py", "experiments/quickstart.yaml", "README.md", "environment.md"]


def test_runtime_env_never_uploads_env_or_key_files(tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name in SECRETS + KEPT:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("sk-not-for-the-cluster\n")
    excludes = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "package.zip"

    # include_gitignore=False: the excludes alone must hold (RAY_RUNTIME_ENV_IGNORE_GITIGNORE)
    create_package(str(project), package, include_gitignore=False, excludes=excludes)

    uploaded = set(zipfile.ZipFile(package).namelist())
    assert set(KEPT) <= uploaded
    assert sorted(set(SECRETS) & uploaded) == []
