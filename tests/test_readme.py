"""The README's flag list is the Config's: every flag listed, none that does not exist."""

import dataclasses
import re

from tests.conftest import REPO
from tf_finetune.config import Config


def _flags_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Flags")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_lists_every_flag_and_only_real_ones():
    listed = set(re.findall(r"`--(\w+)", _flags_section()))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not fields - listed, f"flags the README's Flags section does not list: {fields - listed}"
    assert not listed - fields, f"the README lists flags that do not exist: {listed - fields}"


def test_readme_groups_match_the_help_topics():
    section = _flags_section()
    for f in dataclasses.fields(Config):
        group = f.metadata["group"]
        paragraph = section[section.index(f"**{group}**") :].split("\n\n")[0]
        assert f"`--{f.name}`" in paragraph, f"--{f.name} is not under **{group}**"
