"""Importing a model folder uploaded as an archive into a project's registry.

The folder is extracted by `workers.archives.safe_extract` (zip-slip, links and bombs refused; pickles,
which a Hugging Face snapshot carries beside its safetensors, and a hub's dot-files are left out unread and
listed in the version's `config.skipped`), must look like a Hugging Face (`config.json`) or diffusers
(`model_index.json`) folder with safetensors weights whose headers and offsets are sound, a Hugging Face
folder must be what serving it needs (`check_causal_folder`), and it is published the same way a job
registers a model: objects first, then the row. The project's storage quota is charged the *decompressed* bytes:
the extraction's byte budget is what the project has left, so an archive that expands past it is
refused before anything reaches the object store.

This is blocking work (decompression, parsing): the route runs it on the app's blocking pool.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import check_storage_quota, project_limits, stored_bytes
from api.problems import Problem, field_problem
from workers.archives import ArchiveLimits, ArchiveOverQuota, Source, UnsafeArchiveError, safe_extract
from workers.db import session_scope
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import RegisteredModel, latest_version, new_id

MODEL_NAME_RULE = r"^[a-z0-9][a-z0-9._-]{1,63}$"


def _strip_single_top_folder(names: list[str]) -> str:
    """`mymodel/config.json`, `mymodel/model.safetensors` → the folder is `mymodel/`."""
    tops = {n.split("/", 1)[0] for n in names}
    return next(iter(tops)) if len(tops) == 1 and all("/" in n for n in names) else ""


def model_kind(root: Path) -> str:
    if (root / "model_index.json").is_file():
        return "diffusers"
    if (root / "config.json").is_file():
        return "transformers"
    raise field_problem(
        "/file",
        "the folder has neither config.json (Hugging Face) nor model_index.json "
        "(diffusers) at its top; archive the model folder itself",
        slug="not-a-model-folder",
        title="Not a model folder",
    )


def check_safetensors(path: Path, rel: str) -> None:
    """A safetensors file whose header parses and whose offsets lie inside the file (else a 422 now,
    not a SafetensorError when the model is deployed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as exc:  # SafetensorError and friends: the file is not sound
        raise field_problem(
            "/file",
            f"{rel} is not a valid safetensors file ({type(exc).__name__}: {exc}); save it again with safetensors",
            slug="bad-model-file",
            title="A model file is malformed",
        ) from None


def check_causal_folder(root: Path) -> None:
    """What serving a Hugging Face folder will need, checked at the door (a 422 naming the file and the fix):
    a causal LM transformers builds from its config, safetensors whose tensors are the ones that model has
    (names and shapes, from the headers: nothing is loaded), and a tokenizer."""
    from models.llm.folder import ModelFolderError, check_folder, check_weights

    try:
        check_weights(root, check_folder(root))
    except ModelFolderError as exc:
        raise Problem(
            422,
            "unusable-model-folder",
            "The model folder cannot be used",
            str(exc),
            errors=[{"pointer": "/file", "message": f"{exc.field}: {exc.fix}"}],
        ) from None


def import_model(
    session: Session, store: ObjectStore, settings: Settings, project: str, name: str, source: Source
) -> RegisteredModel:
    """Extract, check and register the archive `source` (bytes, or the upload's file spooled to disk: never
    read whole into memory) as the next version of `name`."""
    _, quota = project_limits(session, settings, project)
    used = stored_bytes(session, project)
    limits = ArchiveLimits(settings.max_archive_files, settings.max_upload_bytes * 4, quota_bytes=quota - used)
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(dir=settings.home) as tmp:
        dest = Path(tmp) / "model"
        try:
            names = safe_extract(source, dest, limits, skipped)
        except ArchiveOverQuota:
            raise Problem(
                413,
                "storage-quota",
                "Project storage quota exceeded",
                f"the archive decompresses to more than the {max(0, quota - used)} bytes project {project} has "
                f"left ({used} stored of its limit of {quota} bytes; decompressed bytes count); nothing was "
                "stored; delete old jobs, models or datasets, or ask the operator to raise the quota",
                errors=[{"pointer": "/file", "message": "over the project's storage quota once decompressed"}],
                extra={"limit_bytes": quota, "used_bytes": used},
            ) from None
        except UnsafeArchiveError as exc:
            raise Problem(
                exc.status,
                "unsafe-archive",
                "The archive was refused",
                str(exc),
                errors=[{"pointer": exc.field, "message": str(exc)}],
            ) from None
        top = _strip_single_top_folder(names)
        root = dest / top if top else dest
        kind = model_kind(root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not any(p.suffix == ".safetensors" for p in files):
            pickles = [n for n in skipped if not n.rsplit("/", 1)[-1].startswith(".")]
            if pickles:
                raise field_problem(
                    "/file",
                    f"the folder's weights are pickles ({', '.join(pickles[:3])}), which are never loaded here; "
                    "convert them to safetensors (save_pretrained(..., safe_serialization=True))",
                    status=415,
                    slug="no-safetensors",
                    title="No safetensors weights",
                )
            raise field_problem(
                "/file",
                "the folder has no .safetensors weights; save the model with safe_serialization=True",
                slug="no-safetensors",
                title="No safetensors weights",
            )
        for p in files:
            if p.suffix == ".safetensors":
                check_safetensors(p, p.relative_to(root).as_posix())
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise field_problem(
                        "/file",
                        f"{p.relative_to(root)} is not valid JSON",
                        slug="bad-model-file",
                        title="A model file is malformed",
                    ) from None
        if kind == "transformers":
            check_causal_folder(root)
        check_storage_quota(session, settings, project, sum(p.stat().st_size for p in files))
        config = {"imported": True, "format": kind} | ({"skipped": skipped} if skipped else {})
        row_id = register_next_version(session, store, settings, project, name, root, files, config)
        shutil.rmtree(dest, ignore_errors=True)
    row = session.get(RegisteredModel, row_id)
    assert row is not None
    return row


def register_next_version(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    project: str,
    name: str,
    root: Path,
    files: list[Path],
    config: dict[str, Any],
) -> int:
    """Upload `files` and register them as the next version of `name`; the row's id.

    Two imports of one name at once both read the same next version: each try uploads under a prefix of its
    own (the version, then a fresh id), so neither writes over, or on losing deletes, the other's files; the
    row is committed in a short transaction of its own, and the loser of the unique (project, name, version)
    takes the next number. What a refused try uploaded is removed again."""
    session.commit()  # no lock held by the request's transaction while the files upload
    for _ in range(5):
        version = (latest_version(session, project, name) or 0) + 1
        session.commit()
        prefix = f"models/{project}/{name}/{version}/import-{new_id()}"
        manifest = {}
        try:
            for p in files:
                rel = p.relative_to(root).as_posix()
                stored = store.put_file(f"{prefix}/{rel}", p)
                manifest[rel] = {"size": stored.size, "sha256": stored.sha256}
            with session_scope(settings.database_url) as s:
                row = RegisteredModel(
                    project=project,
                    name=name,
                    version=version,
                    source_job_id=None,
                    key=prefix,
                    config=config,
                    files=manifest,
                )
                s.add(row)
                s.flush()
                row_id = row.id
            return row_id
        except IntegrityError:
            store.delete_prefix(prefix + "/")  # another import took this version: try the next
        except BaseException:
            store.delete_prefix(prefix + "/")
            raise
    raise Problem(
        409,
        "model-version-race",
        "Concurrent imports of one model",
        f"five imports of {name} registered versions while this one was being stored; try again",
    )
