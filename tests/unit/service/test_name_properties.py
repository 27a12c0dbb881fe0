"""Property tests (hypothesis) for the names users hand the service: artifact and archive-member
paths, dataset, model and project names. Whatever is accepted stays inside its folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from api.auth import PROJECT_NAME_RULE
from api.model_imports import MODEL_NAME_RULE
from models.context import ArtifactNameError, check_artifact_name
from workers.archives import UnsafeArchiveError, _check_member_name
from workers.datasets import NAME_RULE

ROOT = Path("/srv/crucible/objects/jobs/J")
# Paths built from the pieces attacks are made of, plus arbitrary text.
SEGMENTS = st.sampled_from(["..", ".", "", "a", "b.png", "~", "%2e%2e", "\\..", "\x00", "C:", "..\\x", " ", "é"])
PATHS = st.one_of(st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join), st.text(max_size=40))


def inside(root: Path, name: str) -> bool:
    return os.path.normpath(root / name).startswith(str(root) + os.sep)


@settings(max_examples=400, deadline=None)
@given(PATHS)
def test_an_accepted_artifact_name_never_leaves_the_job_folder(name):
    try:
        clean = check_artifact_name(name)
    except ArtifactNameError:
        return
    assert inside(ROOT, clean) and not clean.startswith("/") and ".." not in clean.split("/")
    assert all(ord(c) >= 32 for c in clean) and "\\" not in clean and "%" not in clean
    assert check_artifact_name(clean) == clean  # normal form is stable


@settings(max_examples=400, deadline=None)
@given(PATHS)
def test_an_accepted_archive_member_never_leaves_the_model_folder(name):
    try:
        clean = _check_member_name(name)
    except UnsafeArchiveError:
        return
    assert inside(ROOT, clean) and all(ord(c) >= 32 and ord(c) != 127 for c in clean)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_dataset_model_and_project_names_are_single_safe_segments(name):
    for rule in (NAME_RULE, MODEL_NAME_RULE, PROJECT_NAME_RULE.pattern):
        if re.match(rule, name):
            assert "/" not in name and name not in (".", "..") and not name.startswith(".")
            assert 2 <= len(name) <= 64 and name == name.strip() and name.isascii()
