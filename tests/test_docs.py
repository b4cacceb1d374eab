"""The documentation stays true: the configuration reference is what the config's docstrings
generate, the site builds with `mkdocs build --strict` (no broken link, anchor or page), and every
command of docs/getting-started.md runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsim import config_docs
from fedsim.config import ExperimentConfig
from tests.conftest import config_leaf_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"


# --- the configuration reference -------------------------------------------------------------


def test_config_reference_is_up_to_date():
    committed = (DOCS / "configuration-reference.md").read_text(encoding="utf-8")
    assert committed == config_docs.render(), (
        "docs/configuration-reference.md is out of date with fedsim/config.py: "
        "run `python -m fedsim.config_docs` and commit the result"
    )


def test_every_config_key_is_in_the_reference():
    text = (DOCS / "configuration-reference.md").read_text(encoding="utf-8")
    keys = config_leaf_keys(ExperimentConfig())
    assert len(keys) > 50
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from docs/configuration-reference.md: {missing}"
    assert sorted(keys) == sorted(config_docs.all_keys())


def test_reference_renders_literals_optionals_lists_aliases_and_gaps(tmp_path, monkeypatch):
    source = textwrap.dedent(
        '''
        from __future__ import annotations
        from dataclasses import dataclass, field
        from typing import Any, Literal, Optional

        Kind = Literal["iid", "dirichlet"]
        KINDS = ("iid", "dirichlet")

        @dataclass
        class Inner:
            """The inner section."""

            kind: Kind = "iid"
            """How to split."""
            mode: Literal["a", "b"] | None = None
            """A literal or nothing."""
            names: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
            """Module names."""
            size: Optional[int] = 3
            anything: Any = None
            """Free-form."""

        @dataclass
        class Root:
            inner: Inner = field(default_factory=Inner)
            rate: float = 3e-4
            """A rate; spans
            two lines."""
        '''
    )
    (tmp_path / "docs_probe_config.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location(
        "docs_probe_config", tmp_path / "docs_probe_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_probe_config"] = module
    try:
        spec.loader.exec_module(module)
        sections = config_docs.build_tree(module.Root(), dotted="cfg.")
        keys = {k.dotted: k for top in sections for s in top.walk() for k in s.keys}
        text = config_docs.render(sections)
    finally:
        del sys.modules["docs_probe_config"]
    assert [s.dotted for top in sections for s in top.walk()] == ["cfg.inner"]
    assert keys["cfg.inner.kind"].type == '"iid" | "dirichlet"'
    assert keys["cfg.inner.mode"].type == '"a" | "b" | null'
    assert keys["cfg.inner.names"].type == "list[str]"
    assert keys["cfg.inner.size"].type == "int | null"
    assert keys["cfg.inner.anything"].type == "any"
    assert keys["cfg.inner.size"].doc is None
    assert '| `cfg.inner.kind` | "iid" \\| "dirichlet" | `iid` | How to split. |' in text
    assert "| `cfg.inner.names` | list[str] | `[q_proj, v_proj]` | Module names. |" in text
    assert "| `cfg.inner.size` | int \\| null | `3` | *(undocumented)* |" in text
    assert "The inner section." in text
    assert "1 undocumented" in text


# --- the site ------------------------------------------------------------------------------


def test_docs_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "execution-model" / "index.html").exists()


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav) -> list[str]:
        out = []
        for item in nav:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                for value in item.values():
                    out += pages(value) if isinstance(value, list) else [value]
        return out

    in_nav = set(pages(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk - in_nav == set(), "pages missing from mkdocs.yml's nav"


def test_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "the README is the front door: move details to docs/"
    assert readme.count("\nmake quickstart\nmake test\n") == 1
    targets = re.findall(r"\]\(((?:docs/)[^)#]*)", readme)
    assert targets, "the README links to the docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


# --- getting started: every command runs ------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def getting_started_blocks() -> list[tuple[str, str]]:
    """The fenced blocks of docs/getting-started.md as (language, text), in order."""
    return [(m[1], m[2]) for m in FENCE.finditer(GETTING_STARTED.read_text(encoding="utf-8"))]


def _commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


NUMBER = r"\d+(?:\.\d+)?"


def _shape(line: str) -> re.Pattern[str]:
    """A pattern for `line` with any numbers and any run of spaces (match it against an output
    line with its spaces collapsed): shown output is an example of a run, not its exact bytes."""
    return re.compile(NUMBER.join(re.escape(p) for p in re.split(NUMBER, " ".join(line.split()))))


def test_getting_started_blocks_are_commands_or_output():
    """Every fenced block is a command block (```bash, run below) or its output (```text), so no
    command on the page escapes the test."""
    blocks = getting_started_blocks()
    assert {lang for lang, _ in blocks} <= {"bash", "text"}, [lang for lang, _ in blocks]
    assert sum(lang == "bash" for lang, _ in blocks) >= 5


@pytest.mark.ray
@pytest.mark.slow  # builds the default tiny model (1,500 pretraining steps): 1-3 minutes
def test_getting_started_commands_run(tmp_path):
    """Run each ```bash block of the page, in order, in a scratch copy of the repository's
    experiments (the run directory lands in tmp_path/runs); a ```text block that follows one is
    its output, checked line by line up to the numbers."""
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the page's `fedsim run` starts its own local Ray
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    blocks = getting_started_blocks()
    timings = []
    for i, (lang, block) in enumerate(blocks):
        if lang != "bash":
            continue
        for command in _commands(block):
            start = time.monotonic()
            result = subprocess.run(
                command,
                shell=True,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            timings.append((command, time.monotonic() - start))
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{command}\n{output}"
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            lines = [line for line in blocks[i + 1][1].splitlines() if line.strip() != "..."]
            for line in lines:
                pattern = _shape(line)
                assert any(pattern.fullmatch(" ".join(o.split())) for o in output.splitlines()), (
                    f"{command}: no output line like {line!r} in\n{output}"
                )
    assert (tmp_path / "runs" / "quickstart" / "report" / "report.md").exists()
    print("\n".join(f"{seconds:6.1f} s  {command}" for command, seconds in timings))
