"""Deployments: a registered model of the project, served warm; and the image endpoint of diffusion ones.

Creating a deployment resolves the model (`name` or `name@version`, pinned to a version), detects
its kind from the folder, validates the engine options and loads the model once, so a folder that
cannot be served fails at creation with a 4xx naming the field, and the first request is fast.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response, status
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import InferenceLimitDep, PrincipalDep, audit
from api.deps import SessionDep, SettingsDep, StoreDep
from api.model_refs import model_not_found
from api.openapi import errors
from api.problems import Problem, field_problem
from api.schemas import json_number_lists, json_numbers
from serving.engines import detect_kind, validate_engine
from serving.manager import DeploymentManager, Loaded, load, loaded_bytes
from workers.context import resolve_model
from workers.settings import Settings
from workers.storage import ObjectStore
from workers.tables import Deployment, RegisteredModel

if TYPE_CHECKING:
    from models.diffusion.sampling import SampleRequest

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])
DEPLOYMENT_NAME_RULE = r"^[a-z0-9][a-z0-9._-]{1,63}$"
MAX_INT = 2**31 - 1  # counts and ids of a request: far beyond any cap, and inside every integer type on the way


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "chat", "model": "llm-base-tiny@1", "engine": {"max_n": 2}}]},
    )

    name: str = Field(
        ..., pattern=DEPLOYMENT_NAME_RULE, description="unique in the project; the `model` of OpenAI requests"
    )
    model: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="a registered model: `name` (latest) or `name@version`; or the absolute path of a model folder "
        "under one of the server's import roots (CRUCIBLE_IMPORT_ROOTS), served from where it lies",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="engine options of the model's kind (caps, defaults)"
    )


class DeploymentOut(BaseModel):
    id: str
    name: str
    model: str
    kind: str
    engine: dict[str, Any]
    status: str
    error: str | None
    created_at: Any
    loaded: bool = False
    warm: bool = Field(False, description="held in the server's memory now (else it loads on its next request)")
    memory_bytes: int | None = Field(None, description="bytes its weights take while warm")

    @classmethod
    def of(cls, d: Deployment, loaded: bool = False, memory_bytes: int | None = None) -> DeploymentOut:
        return cls(
            id=d.id,
            name=d.name,
            model=d.model,
            kind=d.kind,
            engine=d.engine or {},
            status=d.status,
            error=d.error,
            created_at=d.created_at,
            loaded=loaded,
            warm=loaded,
            memory_bytes=memory_bytes,
        )


def manager(request: Request) -> DeploymentManager:
    state = request.app.state
    if getattr(state, "deployments", None) is None:
        state.deployments = DeploymentManager(state.settings.serving_memory_bytes)
    return state.deployments


# -- admission: how many requests one deployment may have in flight ------------------
_admission_lock = threading.Lock()


def _busy(loaded: Loaded, settings: Settings) -> Problem:
    cap = settings.max_inflight_per_deployment
    return Problem(
        429,
        "deployment-busy",
        "The deployment is busy",
        f"this deployment has {cap} requests running or waiting for its model "
        "(CRUCIBLE_MAX_INFLIGHT_PER_DEPLOYMENT); retry shortly",
        headers={"Retry-After": "1"},
        extra={"limit": cap},
    )


def check_admission(loaded: Loaded, settings: Settings) -> None:
    if loaded.inflight >= settings.max_inflight_per_deployment:
        raise _busy(loaded, settings)


def acquire(loaded: Loaded, settings: Settings) -> None:
    with _admission_lock:
        check_admission(loaded, settings)
        loaded.inflight += 1


def release(loaded: Loaded) -> None:
    with _admission_lock:
        loaded.inflight -= 1


@contextlib.contextmanager
def admission(loaded: Loaded, settings: Settings) -> Iterator[None]:
    """A place among the deployment's requests in flight (429 when they are full) for the block's duration."""
    acquire(loaded, settings)
    try:
        yield
    finally:
        release(loaded)


def find_deployment(
    session: Session, project: str, name: str, kind: str | None = None, pointer: str = "/name"
) -> Deployment:
    """The project's deployment `name` (of `kind`); any other project's answers 404 exactly like a missing one."""
    row = session.scalars(select(Deployment).where(Deployment.project == project, Deployment.name == name)).first()
    if row is None or (kind is not None and row.kind != kind):
        what = f"no {kind} deployment" if kind else "no deployment"
        raise Problem(
            404,
            "deployment-not-found",
            "No such deployment",
            f"{what} named {name!r}; list them at /api/v1/deployments",
            errors=[{"pointer": pointer, "message": f"{what} named {name!r}"}],
        )
    return row


def pin_model(session: Session, project: str, ref: str) -> RegisteredModel:
    name, _, version = ref.partition("@")
    q = select(RegisteredModel).where(RegisteredModel.project == project, RegisteredModel.name == name)
    if version in ("", "latest"):
        q = q.order_by(RegisteredModel.version.desc())
    elif version.isdigit():
        if int(version) > MAX_INT:  # past the database's integers: no such version, said before the query
            raise field_problem("/model", f"version {version} is past any version number (at most {MAX_INT})")
        q = q.where(RegisteredModel.version == int(version))
    else:
        raise field_problem("/model", "use `name`, `name@latest` or `name@<version number>`")
    row = session.scalars(q.limit(1)).first()
    if row is None:
        raise model_not_found(ref, "/model")
    return row


def folder_problem(exc: Exception, folder: Path | None = None) -> Problem:
    """The kits' load errors as 422s naming the model field at fault (and not where the server caches it)."""
    from models.llm.folder import ModelFolderError

    def text(value: object) -> str:
        return str(value).replace(str(folder), "the model folder") if folder is not None else str(value)

    if isinstance(exc, ModelFolderError):
        return Problem(
            exc.status_code,
            "model-folder-unservable",
            "The model folder cannot be served",
            text(exc),
            errors=[{"pointer": "/model", "message": text(f"{exc.field}: {exc.fix}")}],
        )
    return Problem(
        422,
        "model-folder-unservable",
        "The model folder cannot be served",
        f"model: {text(exc)}",
        errors=[{"pointer": "/model", "message": text(exc)}],
    )


def load_deployment(row: Deployment, settings: Settings, store: ObjectStore) -> Loaded:
    folder = None
    try:
        folder = Path(resolve_model(row.model, settings, store, row.project))
        return load(row.kind, folder, row.engine or {}, row.id)
    except (OSError, ValueError, KeyError) as exc:  # ModelFolderError is a ValueError
        raise folder_problem(exc, folder) from None


def warm(request: Request, row: Deployment, settings: Settings, store: ObjectStore) -> Loaded:
    return manager(request).get(row.id, lambda: load_deployment(row, settings, store))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeploymentOut, responses=errors(404, 409))
def create(
    spec: DeploymentCreate,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    response: Response,
    who: PrincipalDep,
) -> DeploymentOut:
    count = session.scalar(select(func.count()).select_from(Deployment).where(Deployment.project == who.project))
    limit = settings.max_deployments_per_project
    if (count or 0) >= limit:
        raise Problem(
            429,
            "deployment-limit",
            "Too many deployments",
            f"project {who.project} has {count} deployments, its limit (CRUCIBLE_MAX_DEPLOYMENTS_PER_PROJECT is "
            f"{limit}); delete one first",
            extra={"limit": limit},
        )
    if Path(spec.model).is_absolute():  # an operator's folder under an import root, served where it lies
        ref = spec.model
    else:
        model = pin_model(session, who.project, spec.model)
        ref = f"{model.name}@{model.version}"
    if session.scalars(
        select(Deployment.id).where(Deployment.project == who.project, Deployment.name == spec.name)
    ).first():
        raise field_problem(
            "/name",
            f"a deployment named {spec.name!r} exists; delete it or choose another name",
            status=409,
            slug="deployment-exists",
            title="Deployment exists",
        )
    session.commit()  # loading takes a while: no write lock (the key's bookkeeping) is held meanwhile
    try:
        folder = Path(resolve_model(ref, settings, store, who.project))
    except (OSError, ValueError, KeyError) as exc:  # a missing or corrupt stored file
        raise folder_problem(exc) from None
    kind = detect_kind(folder)
    engine = validate_engine(kind, spec.engine, folder)  # with the folder: a KV budget vs its context, trained parts
    row = Deployment(
        project=who.project, name=spec.name, model=ref, kind=kind, engine=engine, status="ready", created_by=who.key_id
    )
    try:
        loaded = load(kind, folder, engine)
    except (OSError, ValueError, KeyError) as exc:
        raise folder_problem(exc, folder) from None
    size = loaded_bytes(loaded)
    if size > settings.serving_memory_bytes:
        raise Problem(
            422,
            "model-too-large",
            "The model does not fit the serving memory",
            f"model: its weights take {size} bytes; this server keeps at most {settings.serving_memory_bytes} "
            "bytes of models warm (CRUCIBLE_SERVING_MEMORY_BYTES)",
            errors=[{"pointer": "/model", "message": f"{size} bytes > {settings.serving_memory_bytes}"}],
        )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise field_problem(
            "/name",
            f"a deployment named {spec.name!r} exists",
            status=409,
            slug="deployment-exists",
            title="Deployment exists",
        ) from None
    loaded.deployment_id = row.id
    audit(session, request, who, "deployment.create", spec.name, model=ref, kind=kind)
    session.commit()
    manager(request).put(loaded)
    response.headers["Location"] = f"/api/v1/deployments/{spec.name}"
    return DeploymentOut.of(row, loaded=True, memory_bytes=size)


@router.get("")
def list_deployments(session: SessionDep, who: PrincipalDep, request: Request) -> dict[str, list[DeploymentOut]]:
    """The project's deployments; `warm` says which are in memory now (the others load on their next request)."""
    memory = manager(request).memory()
    rows = session.scalars(select(Deployment).where(Deployment.project == who.project).order_by(Deployment.name))
    return {"items": [DeploymentOut.of(r, r.id in memory, memory.get(r.id)) for r in rows]}


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(name: str, session: SessionDep, who: PrincipalDep, request: Request) -> DeploymentOut:
    row = find_deployment(session, who.project, name)
    memory = manager(request).memory()
    return DeploymentOut.of(row, row.id in memory, memory.get(row.id))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409))
def delete(name: str, session: SessionDep, who: PrincipalDep, request: Request) -> Response:
    row = find_deployment(session, who.project, name)
    loaded = manager(request).peek(row.id)
    if loaded is not None and loaded.inflight > 0:
        raise Problem(
            409,
            "deployment-in-use",
            "The deployment is serving requests",
            f"deployment {name} has {loaded.inflight} request(s) running or waiting; delete it when they finish",
            headers={"Retry-After": "1"},
            extra={"inflight": loaded.inflight},
        )
    manager(request).evict(row.id)
    session.delete(row)
    audit(session, request, who, "deployment.delete", name, model=row.model)
    return Response(status_code=204)


# -- images ------------------------------------------------------------------------
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
Prompt = str | list[TokenId | None] | None


class ImageRequest(BaseModel):
    """One image request; everything is optional (a bare `{}` draws one unconditional-guided sample)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"prompt": "red bold 3", "guidance": "apg", "scale": 8, "eta": 0, "n": 4, "seed": 1}]
        },
    )

    prompt: Prompt = Field(None, description='words ("red bold 3") or token ids [digit, colour, thickness]')
    class_: int | None = Field(None, alias="class", ge=0, le=9, description="a digit class (instead of a prompt)")
    negative_prompt: Prompt = None
    guidance: Literal["none", "cfg", "apg"] | None = Field(None, description="default: cfg if the model supports it")
    scale: float = Field(4.0, ge=0, le=100, description="guidance scale w")
    eta: float = Field(0.0, ge=0, le=1, description="APG: weight of the parallel component")
    norm_threshold: float | None = Field(None, gt=0, description="APG: rescale radius r (none = no rescale)")
    momentum: float = Field(0.0, gt=-1, lt=1, description="APG: momentum β (the paper uses negative values)")
    sampler: str | None = Field(None, max_length=32, description="ddim, ddpm, euler, euler-ancestral, dpm-solver, heun")
    steps: int | None = Field(None, ge=1, le=MAX_INT, description="the deployment's max_steps caps it")
    seed: int | None = Field(None, ge=0, le=MAX_INT, description="image i uses seed + i; random when absent")
    n: int = Field(1, ge=1, le=MAX_INT, description="images; the deployment's max_n caps it")
    width: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="pixels; a latent model (with a VAE) draws multiples of its size step, a "
        "pixel-space model only its native size (422 otherwise); default: the native size",
    )
    height: int | None = Field(None, ge=1, le=4096, description="pixels, as width")
    attention: str = Field("standard", max_length=32)
    _numbers = json_numbers(
        "class_", "scale", "eta", "norm_threshold", "momentum", "steps", "seed", "n", "width", "height"
    )
    _token_ids = json_number_lists("prompt", "negative_prompt")


def native_size(parts: Any) -> int:
    """The side in pixels of the images a diffusion model draws by default."""
    from models.diffusion.sampling import native_size as side

    return side(parts)


def png_base64(image01: Any) -> str:
    arr = (image01.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sample_request(body: ImageRequest, loaded: Loaded) -> SampleRequest:
    from models.diffusion.guidance import GuidanceSpec
    from models.diffusion.sampling import SampleRequest

    engine, parts = loaded.engine, loaded.diffusion
    assert parts is not None
    steps = body.steps or engine.get("default_steps", 30)
    if steps > engine.get("max_steps", 100):
        raise field_problem("/steps", f"at most {engine.get('max_steps', 100)} steps on this deployment")
    if body.n > engine.get("max_n", 8):
        raise field_problem("/n", f"at most {engine.get('max_n', 8)} images per request on this deployment")
    if body.class_ is not None and body.prompt is not None:
        raise field_problem("/class", "send either `prompt` or `class`, not both")
    prompt = [body.class_, None, None] if body.class_ is not None else body.prompt
    guidance = body.guidance or ("cfg" if parts.null_conditioning else "none")
    spec = GuidanceSpec(
        guidance, body.scale, body.eta, math.inf if body.norm_threshold is None else body.norm_threshold, body.momentum
    )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - body.n)
    return SampleRequest(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        guidance=spec,
        sampler=body.sampler or engine.get("default_sampler", "ddim"),
        steps=steps,
        seed=seed,
        n=body.n,
        attention=body.attention,
        width=body.width,
        height=body.height,
    )


def generate_images(
    row: Deployment, body: ImageRequest, request: Request, settings: Settings, store: ObjectStore
) -> dict[str, Any]:
    from models.diffusion.sampling import SamplingRequestError, sample

    loaded = warm(request, row, settings, store)
    req = sample_request(body, loaded)
    assert loaded.diffusion is not None
    started = time.perf_counter()
    try:
        with admission(loaded, settings), loaded.lock:
            result = sample(loaded.diffusion, req)
    except SamplingRequestError as exc:
        raise field_problem(
            f"/{exc.param}",
            str(exc).split(": ", 1)[-1],
            slug="unsupported-request",
            title="The model cannot serve this request",
        ) from None
    return {
        "created": int(time.time()),
        "model": row.name,
        "data": [{"b64_json": png_base64(img), "seed": s} for img, s in zip(result.images, result.seeds)],
        "guidance": req.guidance.name,
        "sampler": req.sampler,
        "steps": req.steps,
        "seconds": round(time.perf_counter() - started, 3),
    }


@router.post("/{name}/images")
def images(
    name: str,
    body: ImageRequest,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    who: InferenceLimitDep,
) -> dict[str, Any]:
    """PNG images (base64) with the seed of each, from a diffusion deployment."""
    row = find_deployment(session, who.project, name, kind="diffusion")
    session.commit()  # no transaction stays open while it samples
    return generate_images(row, body, request, settings, store)
