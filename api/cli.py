"""The `crucible` command: serve the stack, submit and watch jobs, fetch results, run reproductions."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workers.quiet import quiet_third_party
from workers.settings import Settings, load_plugins

console = Console()
err = Console(stderr=True)
TERMINAL = ("succeeded", "failed", "cancelled")


class Api:
    """A thin HTTP client that turns problem bodies into readable CLI errors."""

    def __init__(self, url: str, key: str = ""):
        self.url = url
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, timeout=30, headers=headers)

    def __call__(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            err.print(
                f"[red]cannot reach the Crucible API at {self.url}[/]; start it with `make up` or set CRUCIBLE_API_URL"
            )
            sys.exit(2)
        if r.status_code >= 400:
            self.fail(r)
        return (
            r.json() if r.headers.get("content-type", "").startswith(("application/json", "application/problem")) else r
        )

    def fail(self, r: httpx.Response) -> NoReturn:
        """Print the problem body's title and detail (or the raw text) and exit 1."""
        try:
            body = r.json()
            err.print(f"[red]{body.get('title', 'error')}[/] ({r.status_code}): {body.get('detail', '')}")
        except ValueError:
            err.print(f"[red]HTTP {r.status_code}[/]: {r.text[:500]}")
        sys.exit(1)


def _api() -> Api:
    settings = Settings()
    return Api(settings.api_url, settings.cli_key())


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}


def _schema_types(schema: dict[str, Any], field: dict[str, Any] | None) -> set[str]:
    """The JSON types a params field takes (its `type`, or those of its `anyOf`/`$ref` branches); empty: unknown."""
    if not field:
        return set()
    if "$ref" in field:
        return _schema_types(schema, schema.get("$defs", {}).get(field["$ref"].rsplit("/", 1)[-1]))
    types = {field["type"]} if isinstance(field.get("type"), str) else set(field.get("type") or ())
    for branch in field.get("anyOf", ()):
        types |= _schema_types(schema, branch)
    if "enum" in field:
        types |= {JSON_TYPES.get(type(v), "null") for v in field["enum"]}
    return types


def _parse_params(pairs: tuple[str, ...], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """`key=value` pairs; a value is parsed as JSON when it can be, unless the field's schema (the method's params
    schema, when given) says it is a string and JSON made it something else: `sparsity=0.5` stays "0.5"."""
    params: dict[str, Any] = {}
    props = (schema or {}).get("properties", {})
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: write params as key=value", param_hint="-p")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        types = _schema_types(schema or {}, props.get(key))
        kind = "null" if value is None else JSON_TYPES.get(type(value), "")
        taken = kind in types or (kind == "integer" and "number" in types)
        params[key] = raw if "string" in types and not taken else value
    return params


@click.group()
def main() -> None:
    """Crucible: run recent ML research methods as tracked, resumable jobs."""
    quiet_third_party()  # before any command imports torch's neighbours: their kernel warnings are noise here


# -- serving -------------------------------------------------------------------
@main.command()
@click.option("--host", default=None, help="bind address (default 127.0.0.1)")
@click.option("--port", default=None, type=int, help="port (default 8000)")
@click.option("--demo/--no-demo", default=None, help="queue a demo job when the database has none")
def up(host: str | None, port: int | None, demo: bool | None) -> None:
    """Apply migrations and serve the API, the local executor and the dashboard."""
    import uvicorn

    from api.app import create_app
    from api.auth import bootstrap_admin_key
    from workers.db import upgrade

    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = Settings(**overrides)
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    key = bootstrap_admin_key(settings)
    if demo if demo is not None else settings.demo_job:
        _queue_demo(settings)
    base = f"http://{settings.host}:{settings.port}"
    for line in banner(base, settings, key, sys.stdout.isatty()):
        click.echo(line)
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False
    )  # the dashboard polls every 2 s; access lines would drown the log


def banner(base: str, settings: Settings, key: str, terminal: bool) -> list[str]:
    """What `up` prints. Plain lines, never wrapped or marked up: a terminal's URL detection and a copy
    and paste get the whole login link, however narrow the window."""
    lines = [f"Crucible on {base}  (state in {settings.home})"]
    if terminal:  # the login link holds the key: a terminal may show it, a log file may not
        lines += ["  log the browser in once with this link:", f"  {base}/?token={key}"]
    else:
        lines.append(f"  log the browser in with {base}/?token=<the key in {settings.admin_key_file}>")
    lines.append(f"  the CLI uses the admin key in {settings.admin_key_file} (or CRUCIBLE_API_KEY)")
    return lines


@main.command()
@click.option("--queues", "-Q", default=None, help="comma-separated resource classes (default cpu, plus gpu with CUDA)")
@click.option("--concurrency", "-c", default=None, type=int, help="jobs at once (default CRUCIBLE_MAX_CONCURRENT_JOBS)")
@click.option("--name", "-n", default=None, help="Celery node name (default crucible-HOST-PID@HOST)")
@click.option("--loglevel", default="INFO")
def worker(queues: str | None, concurrency: int | None, name: str | None, loglevel: str) -> None:
    """Join the stack as a Celery worker (CRUCIBLE_DATABASE_URL, _REDIS_URL, _STORAGE_URL point at it)."""
    from workers.executors.celery import default_queues, run_worker

    settings = Settings()
    run_worker(
        settings,
        queues.split(",") if queues else default_queues(),
        concurrency or settings.max_concurrent_jobs,
        name=name,
        loglevel=loglevel,
    )


def _queue_demo(settings: Settings) -> None:
    """On a fresh state folder, queue the service's main job so the dashboard shows something real."""
    from sqlalchemy import func, select

    from api.jobs import submit
    from api.schemas import JobCreate
    from workers.db import session_scope
    from workers.tables import Job

    with session_scope(settings.database_url) as s:
        if s.scalar(select(func.count()).select_from(Job)):
            return
        job, _ = submit(
            s,
            settings,
            JobCreate(method="ldr", dataset="digits", params={"noise_rate": 0.4}, tags={"demo": "true"}),
            None,
        )
        console.print(f"queued demo job [cyan]{job.id}[/] (ldr on digits with 40% label noise)")


@main.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    from workers.db import upgrade

    settings = Settings()
    upgrade(settings.database_url, revision)
    console.print(f"database at {revision}: {settings.database_url}")


@db.command("downgrade")
@click.argument("revision", default="base")
def db_downgrade(revision: str) -> None:
    from workers.db import downgrade

    downgrade(Settings().database_url, revision)


# -- access ----------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True)
def whoami(as_json: bool) -> None:
    """The project and role of the key the CLI uses, and the project's limits."""
    me = _api()("GET", "/api/v1/whoami")
    if as_json:
        return _emit(me)
    console.print(f"project [cyan]{me['project']}[/] as [bold]{me['role']}[/] (key {me['key_name'] or me['key_id']})")
    for k, v in me["limits"].items():
        console.print(f"  {k}: {v}")


@main.group(invoke_without_command=True)
@click.pass_context
def keys(ctx: click.Context) -> None:
    """API keys of your project (admins): list, create, revoke."""
    if ctx.invoked_subcommand is None:
        table = Table("id", "prefix", "role", "name", "created", "last used", "revoked")
        for k in _api()("GET", "/api/v1/keys")["items"]:
            table.add_row(
                k["id"],
                k["prefix"] + "…",
                k["role"],
                k["name"],
                k["created_at"][:19],
                (k["last_used_at"] or "")[:19],
                (k["revoked_at"] or "")[:19],
            )
        console.print(table)


@keys.command("create")
@click.option("--role", type=click.Choice(["viewer", "member", "admin"]), default="member")
@click.option("--name", default="", help="what the key is for")
def keys_create(role: str, name: str) -> None:
    """Make a key; its secret is printed once and cannot be shown again."""
    k = _api()("POST", "/api/v1/keys", json={"role": role, "name": name})
    console.print(f"{k['role']} key {k['id']} of project {k['project']} (store it now; it is not shown again):")
    click.echo(k["key"])


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    k = _api()("DELETE", f"/api/v1/keys/{key_id}")
    console.print(f"revoked {k['id']} ({k['prefix']}…)")


def _bytes(value: str | None) -> int | None:
    """`500M`, `10G`, `1T` or a plain number of bytes (binary units)."""
    if value is None:
        return None
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: write bytes as a number or with K, M, G or T", param_hint="--max-stored"
        ) from None


@main.command("project-create")
@click.argument("name")
@click.option("--description", default="")
@click.option("--max-active-jobs", type=click.IntRange(1, 100_000), default=None, help="queued + running jobs at once")
@click.option("--max-stored", "max_stored", default=None, help="stored bytes (artifacts, datasets, models), e.g. 20G")
def project_create(name: str, description: str, max_active_jobs: int | None, max_stored: str | None) -> None:
    """A new project (the server's operator only); prints its first admin key once.

    Without the quota options the project gets the server's defaults (CRUCIBLE_MAX_ACTIVE_JOBS_PER_PROJECT,
    CRUCIBLE_MAX_STORED_BYTES_PER_PROJECT); `crucible project-quotas` changes them later."""
    body: dict[str, Any] = {"name": name, "description": description}
    if max_active_jobs is not None:
        body["max_active_jobs"] = max_active_jobs
    if max_stored is not None:
        body["max_stored_bytes"] = _bytes(max_stored)
    p = _api()("POST", "/api/v1/projects", json=body)
    console.print(f"project [cyan]{p['name']}[/] created{_quotas(p)}; its admin key (store it now):")
    click.echo(p["admin_key"]["key"])


def _quotas(p: dict[str, Any]) -> str:
    jobs, stored = p.get("max_active_jobs"), p.get("max_stored_bytes")
    return (
        f" (at most {jobs or 'the default number of'} active jobs, "
        f"{f'{stored} bytes' if stored else 'the default storage'} stored)"
    )


@main.command("project-quotas")
@click.argument("name")
@click.option("--max-active-jobs", type=click.IntRange(1, 100_000), default=None, help="queued + running jobs at once")
@click.option("--max-stored", "max_stored", default=None, help="stored bytes, e.g. 20G")
@click.option(
    "--default",
    "to_default",
    multiple=True,
    type=click.Choice(["max-active-jobs", "max-stored"]),
    help="set this quota back to the server's default",
)
def project_quotas(name: str, max_active_jobs: int | None, max_stored: str | None, to_default: tuple[str, ...]) -> None:
    """Change a project's quotas (the server's operator only); options left out keep their value."""
    body: dict[str, Any] = {}
    if max_active_jobs is not None:
        body["max_active_jobs"] = max_active_jobs
    if max_stored is not None:
        body["max_stored_bytes"] = _bytes(max_stored)
    for field in to_default:
        body["max_active_jobs" if field == "max-active-jobs" else "max_stored_bytes"] = None
    if not body:
        raise click.UsageError("give --max-active-jobs, --max-stored or --default")
    p = _api()("PATCH", f"/api/v1/projects/{name}", json=body)
    console.print(f"project [cyan]{p['name']}[/]{_quotas(p)}")


@main.command("project-archive")
@click.argument("name")
@click.option("--restore", is_flag=True, help="open an archived project for writes again")
def project_archive(name: str, restore: bool) -> None:
    """Make a project read-only, or with --restore writable again (the server's operator only).

    Its keys keep reading its jobs, metrics, artifacts and models; refused while it has queued or running jobs
    or deployments."""
    p = _api()("POST", f"/api/v1/projects/{name}/{'restore' if restore else 'archive'}")
    state = f"archived (read-only) since {p['archived_at']}" if p.get("archived_at") else "open for writes"
    console.print(f"project [cyan]{p['name']}[/] is {state}")


# -- catalogue -----------------------------------------------------------------
def method_catalog() -> list[dict[str, Any]]:
    """Every registered method, described (`MethodSpec.describe()`), without importing torch when it can.

    The method modules import torch and the ML libraries (seconds), so the CLI asks the running server,
    which has them loaded, for `GET /api/v1/methods`. A process that has the registry loaded already
    (a notebook, a test) reads it directly; with no server to ask, the CLI loads it itself and says so."""
    if "models.registry" not in sys.modules:
        settings = Settings()
        key = settings.cli_key()
        try:  # the server's first listing imports every method module: give it time
            r = httpx.get(
                f"{settings.api_url}/api/v1/methods",
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=300,
            )
            if r.status_code == 200:
                return list(r.json()["items"])
            reason = f"the server at {settings.api_url} answered {r.status_code}"
        except httpx.TransportError:
            reason = f"no Crucible server at {settings.api_url}"
        err.print(f"[dim]{reason}; loading the method registry in this process (imports torch)[/]", soft_wrap=True)
        load_plugins(settings)
    from models.registry import list_methods

    return [m.describe() for m in list_methods()]


@main.command()
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True)
def methods(pattern: str, as_json: bool) -> None:
    """List registered methods whose id or family matches PATTERN (shell-style, e.g. 'llm-*' or 'ldr')."""
    from api.catalog import describe_match, match_methods

    catalog = method_catalog()
    items, matched_by = match_methods(catalog, pattern)
    if as_json:
        return _emit(items)
    if not items:
        families = ", ".join(sorted({m["family"] for m in catalog}))
        err.print(f"no method matches {pattern!r} (by id or family); the families are {families}", soft_wrap=True)
        sys.exit(1)
    if pattern not in ("", "*"):
        err.print(f"[dim]{describe_match(pattern, catalog, matched_by)}[/]", soft_wrap=True)
    headers = ("id", "family", "task", "datasets", "repro", "paper")
    rows = [
        (m["id"], m["family"], m["task"], ", ".join(m["datasets"]), "✓" if m["reproduction"] else "", m["paper"])
        for m in items
    ]
    if console.is_terminal:  # titles end at the terminal's edge, on one line (piped, they are kept whole)
        fixed = sum(max(cell_len(h), *(cell_len(r[i]) for r in rows)) + 3 for i, h in enumerate(headers[:-1]))
        room = max(20, console.width - fixed - 4)
        rows = [(*r[:-1], r[-1] if cell_len(r[-1]) <= room else r[-1][: room - 1] + "…") for r in rows]
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def datasets(ctx: click.Context, as_json: bool) -> None:
    """List datasets (built-in and uploaded) with their kind."""
    if ctx.invoked_subcommand:
        return
    items = _api()("GET", "/api/v1/datasets")["items"]
    if as_json:
        return _emit(items)
    table = Table("name", "kind", "source", "description")
    for d in items:
        table.add_row(d["name"], d["kind"], d["source"], d["description"])
    console.print(table)


@datasets.command("upload")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kind", required=True, help="image-class, tabular, text-corpus, …")
@click.option("--description", default="")
def datasets_upload(name: str, file: Path, kind: str, description: str) -> None:
    """Upload an .npz or .jsonl file as dataset NAME (validated against KIND)."""
    with open(file, "rb") as f:
        out = _api()(
            "POST",
            "/api/v1/datasets",
            data={"name": name, "kind": kind, "description": description},
            files={"file": (file.name, f)},
        )
    console.print(f"stored dataset [cyan]{out['name']}[/] ({out['kind']}): {out['meta']}")


@datasets.command("delete")
@click.argument("name")
def datasets_delete(name: str) -> None:
    """Delete the uploaded dataset NAME (refused while a queued or running job uses it)."""
    _api()("DELETE", f"/api/v1/datasets/{name}")
    console.print(f"deleted dataset {name}")


# -- models ----------------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the project's registered models (every version); see the subcommands to upload, download, delete."""
    if ctx.invoked_subcommand:
        return
    items = _api()("GET", "/api/v1/models")["items"]
    if as_json:
        return _emit(items)
    table = Table("ref", "format", "from job", "files", "size")
    for m in items:
        size = sum(int(f.get("size", 0)) for f in m["files"].values())
        kind = m["config"].get("format") or ("job" if m["source_job_id"] else "")
        table.add_row(m["ref"], kind, m["source_job_id"] or "", str(len(m["files"])), _size(size))
    console.print(table)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pack(folder: Path, spool: Any) -> None:
    """A folder as a .tar.gz (relative names, regular files only) into the open file `spool`."""
    import tarfile

    with tarfile.open(fileobj=spool, mode="w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tf.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    spool.seek(0)


@contextmanager
def console_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr (hidden when stderr is not a terminal); yields `advance(n)`."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    columns = [TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda n: bar.advance(task, n)


def send_resumable(api: Api, spool: Any, filename: str, retries: int = 5) -> str:
    """Send the open file `spool` as a resumable upload (`POST /api/v1/uploads`, then parts at the server's
    offset) and return its id. A broken connection or a 5xx is retried from the offset the server reports, with
    backoff, so a large model survives a flaky network; the file is hashed first so the server checks what it
    assembled. Progress goes to stderr."""
    import hashlib

    digest, size = hashlib.sha256(), 0
    spool.seek(0)
    while chunk := spool.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    up = api("POST", "/api/v1/uploads", json={"filename": filename, "size": size, "sha256": digest.hexdigest()})
    part_bytes, offset, failures = min(int(up["part_bytes"]), 16 << 20), int(up["offset"]), 0
    with console_progress(size, f"uploading {filename}") as advance:
        while offset < size:
            spool.seek(offset)
            part = spool.read(part_bytes)
            try:
                r = api.http.patch(
                    f"/api/v1/uploads/{up['id']}",
                    content=part,
                    headers={"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
                    timeout=600,
                )
            except httpx.TransportError as exc:
                r, reason = None, f"{type(exc).__name__}: {exc}"
            if r is not None and r.status_code < 400:
                new = int(r.json()["offset"])
            elif r is not None and r.status_code == 409 and "offset" in r.json():
                new = int(r.json()["offset"])  # the server has more (or less) than we thought: carry on from there
            elif r is not None and r.status_code < 500:
                api.fail(r)
            else:
                failures += 1
                if failures > retries:
                    err.print(f"[red]the upload failed {failures} times[/]; resume it later with the same command")
                    sys.exit(1)
                reason = reason if r is None else f"HTTP {r.status_code}"
                err.print(f"[yellow]part at byte {offset} failed ({reason}); resuming[/]")
                time.sleep(min(30.0, 0.5 * 2**failures))
                new = int(api("GET", f"/api/v1/uploads/{up['id']}")["offset"])
            advance(new - offset)
            offset = new
    return str(up["id"])


@models.command("upload")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def models_upload(name: str, path: Path, as_json: bool) -> None:
    """Upload PATH (a model folder, packed here as a .tar.gz, or a .zip / .tar.gz of one) as a new version of NAME."""
    import tempfile

    with tempfile.TemporaryFile() if path.is_dir() else path.open("rb") as spool:  # streamed, never read whole
        if path.is_dir():
            _pack(path, spool)
        filename = f"{path.name or name}.tar.gz" if path.is_dir() else path.name
        api = _api()
        upload_id = send_resumable(api, spool, filename)
        out = api("POST", "/api/v1/models", data={"name": name, "upload": upload_id}, timeout=600)
    if as_json:
        return _emit(out)
    console.print(f"registered [cyan]{out['ref']}[/] ({out['config'].get('format')}, {len(out['files'])} files)")
    for note in out.get("notes", []):
        err.print(f"[dim]{note}[/]", soft_wrap=True)


def _save_stream(
    api: Api, url: str, params: dict[str, str], place: Callable[[str], Path], fallback: str, timeout: float
) -> tuple[Path, str, httpx.Headers]:
    """GET `url` streamed into the file `place(filename)` names (the filename from Content-Disposition, else
    `fallback`); the written path, the filename and the response headers. A problem body is reported and exits."""
    with api.http.stream("GET", url, params=params, timeout=timeout) as r:
        if r.status_code >= 400:
            r.read()
            api.fail(r)
        filename = r.headers.get("content-disposition", "").partition('filename="')[2].rstrip('"') or fallback
        target = place(filename)
        with open(target, "wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
        return target, filename, r.headers


@models.command("download")
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="the .tar.gz to write")
@click.option(
    "--extract",
    "extract_to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="unpack into this folder instead (the model lands in <folder>/<name>-<version>)",
)
def models_download(ref: str, output: Path | None, extract_to: Path | None) -> None:
    """Download REF (`name@version`, or `name` for the latest) as a .tar.gz of its folder, or unpack it."""
    import tarfile
    import tempfile

    def place(filename: str) -> Path:
        return output or (Path(tempfile.mkdtemp()) / filename if extract_to else Path(filename))

    target, filename, _ = _save_stream(_api(), f"/api/v1/models/{ref}/download", {}, place, "model.tar.gz", timeout=600)
    if extract_to is None:
        return console.print(f"wrote {target} ({_size(target.stat().st_size)})")
    with tarfile.open(target, "r:gz") as tf:
        tf.extractall(extract_to, filter="data")  # names the server wrote; the data filter refuses anything else
    console.print(f"unpacked {ref} into {extract_to / filename.removesuffix('.tar.gz')}")


@models.command("export")
@click.argument("ref")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["compressed-tensors", "gguf"]),
    required=True,
    help="compressed-tensors (vLLM, llm-compressor) or gguf (llama.cpp, Ollama; Llama, Mistral, Qwen2 only)",
)
@click.option(
    "--quantization",
    type=click.Choice(["dense", "int8", "int4"]),
    default="dense",
    show_default=True,
    help="weights as stored, int8 (per channel / Q8_0) or int4 (groups of 128 / Q4_0)",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="the file to write")
def models_export(ref: str, fmt: str, quantization: str, output: Path | None) -> None:
    """Export REF (`name@version`, or `name` for the latest) for another engine: a compressed-tensors folder as a
    .tar.gz, or a .gguf file."""
    params = {"format": fmt, "quantization": quantization}
    url = f"/api/v1/models/{ref}/export"
    target, _, headers = _save_stream(_api(), url, params, lambda name: output or Path(name), "export", timeout=3600)
    if notes := headers.get("x-export-notes"):
        err.print(f"[dim]{notes}[/]", soft_wrap=True)
    console.print(f"wrote {target} ({_size(target.stat().st_size)})")


@models.command("delete")
@click.argument("ref")
def models_delete(ref: str) -> None:
    """Delete the version REF (`name@version`; refused while a deployment or a queued or running job uses it)."""
    name, _, version = ref.partition("@")
    if not version.isdigit():
        raise click.BadParameter("name the version to delete, e.g. llama@2", param_hint="REF")
    _api()("DELETE", f"/api/v1/models/{name}/{version}")
    console.print(f"deleted {ref}")


# -- jobs ----------------------------------------------------------------------
@main.command()
@click.argument("method")
@click.option("-d", "--dataset", default=None, help="dataset name")
@click.option(
    "-p", "--param", "params", multiple=True, help="key=value, read as the type the method's params schema gives key"
)
@click.option("--seed", default=0, type=int)
@click.option("--priority", default=0, type=int)
@click.option("--gpus", default=0.0, type=float)
@click.option("--reproduce", is_flag=True, help="run the method's paper-claim reproduction as the job")
@click.option("--idempotency-key", default=None)
@click.option("--follow", "-f", is_flag=True, help="show a live progress bar until the job ends")
@click.option("--json", "as_json", is_flag=True)
def submit(
    method: str,
    dataset: str | None,
    params: tuple[str, ...],
    seed: int,
    priority: int,
    gpus: float,
    reproduce: bool,
    idempotency_key: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Queue METHOD on a dataset (each -p value is read as the type the method's params schema gives it)."""
    api = _api()
    schema = api("GET", f"/api/v1/methods/{method}")["params"] if params and not reproduce else None
    body = {
        "method": method,
        "dataset": dataset,
        "params": _parse_params(params, schema),
        "seed": seed,
        "priority": priority,
        "mode": "reproduce" if reproduce else "run",
        "resources": {"gpus": gpus},
    }
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = api("POST", "/api/v1/jobs", json=body, headers=headers)
    if not follow:
        return _emit(job) if as_json else console.print(f"queued [cyan]{job['id']}[/] ({job['method']})")
    final = _follow(api, job["id"], quiet=as_json)
    if as_json:
        _emit(final)
    sys.exit(0 if final["status"] == "succeeded" else 1)


def _follow(api: Api, job_id: str, quiet: bool = False) -> dict[str, Any]:
    """Poll the job until it ends, drawing a progress bar with its latest metrics."""
    columns = [
        TextColumn("[bold]{task.fields[status]:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    ]
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task("", total=None, status="queued")
        while True:
            job = api("GET", f"/api/v1/jobs/{job_id}")
            latest = _latest_metrics(api, job_id) if job["status"] in ("running", "cancelling") else {}
            shown = "  ".join(f"{k}={v:.4g}" for k, v in list(latest.items())[:4])
            p = job["progress"]
            bar.update(
                task,
                completed=p["done"],
                total=p["total"] or None,
                status=job["status"],
                description=(p["message"] + "  " + shown).strip(),
            )
            if job["status"] in TERMINAL:
                break
            time.sleep(0.5)
    if not quiet:
        _print_summary(api, job)
    return job


def _latest_metrics(api: Api, job_id: str) -> dict[str, float]:
    points = api("GET", f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 10})["items"]
    latest: dict[str, tuple[int, float]] = {}
    for p in points:
        if p["name"] not in latest or p["step"] >= latest[p["name"]][0]:
            latest[p["name"]] = (p["step"], p["value"])
    return {k: v for k, (_, v) in latest.items()}


def _print_summary(api: Api, job: dict[str, Any]) -> None:
    colour = {"succeeded": "green", "failed": "red"}.get(job["status"], "yellow")
    console.print(f"job [cyan]{job['id']}[/] [{colour}]{job['status']}[/] (attempt {job['attempt']})")
    if job.get("failure") and job["failure"].get("message"):
        console.print(job["failure"]["message"][-2000:])
    metrics = (job.get("result") or {}).get("metrics") or {}
    if metrics:
        table = Table("metric", "final value")
        for k, v in sorted(metrics.items()):
            table.add_row(k, f"{v:.6g}")
        console.print(table)
    arts = api("GET", f"/api/v1/jobs/{job['id']}/artifacts")["items"]
    if arts:
        console.print("artifacts: " + ", ".join(a["name"] for a in arts))


@main.command()
@click.option("--status", default=None, help="comma-separated statuses")
@click.option("--method", default=None)
@click.option("--limit", default=50, type=int)
@click.option("--json", "as_json", is_flag=True)
def jobs(status: str | None, method: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    params = {k: v for k, v in (("status", status), ("method", method), ("limit", limit)) if v}
    page = _api()("GET", "/api/v1/jobs", params=params)
    if as_json:
        return _emit(page["items"])
    table = Table("id", "method", "dataset", "status", "progress", "created")
    for j in page["items"]:
        p = j["progress"]
        table.add_row(
            j["id"],
            j["method"],
            j["dataset"] or "",
            j["status"],
            f"{p['done']}/{p['total']}" if p["total"] else "",
            j["created_at"][:19],
        )
    console.print(table)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def show(job_id: str, as_json: bool) -> None:
    """Show one job."""
    api = _api()
    job = api("GET", f"/api/v1/jobs/{job_id}")
    if as_json:
        return _emit(job)
    _print_summary(api, job)


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@click.option("--json", "as_json", is_flag=True)
def logs(job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's log."""
    api, offset = _api(), 0
    while True:
        chunk = api("GET", f"/api/v1/jobs/{job_id}/logs", params={"offset": offset})
        if as_json:
            return _emit(chunk)
        click.echo(chunk["text"], nl=False)
        offset = chunk["next_offset"]
        if chunk["eof"] or not follow:
            return
        if not chunk["text"]:
            time.sleep(1)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job (any non-terminal state)."""
    out = _api()("POST", f"/api/v1/jobs/{job_id}/cancel")
    _emit(out) if as_json else console.print(f"job {job_id}: {out['status']}")


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="show a live progress bar until the new job ends")
@click.option("--json", "as_json", is_flag=True)
def retry(job_id: str, follow: bool, as_json: bool) -> None:
    """Run a finished job again as a new job that starts from its last checkpoint."""
    api = _api()
    job = api("POST", f"/api/v1/jobs/{job_id}/retry")
    if not follow:
        return _emit(job) if as_json else console.print(f"queued [cyan]{job['id']}[/] (a retry of {job_id})")
    final = _follow(api, job["id"], quiet=as_json)
    if as_json:
        _emit(final)
    sys.exit(0 if final["status"] == "succeeded" else 1)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
def delete(job_ids: tuple[str, ...]) -> None:
    """Delete finished jobs with their metrics, logs, checkpoints and artifacts (cancel a running one first)."""
    api = _api()
    for job_id in job_ids:
        api("DELETE", f"/api/v1/jobs/{job_id}")
        console.print(f"deleted job {job_id}")


@main.command()
@click.argument("job_id")
@click.option(
    "--download",
    "dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="save every artifact under this folder",
)
@click.option("--json", "as_json", is_flag=True)
def artifacts(job_id: str, dest: Path | None, as_json: bool) -> None:
    """List (or download) a job's artifacts."""
    api = _api()
    items = api("GET", f"/api/v1/jobs/{job_id}/artifacts")["items"]
    if dest:
        for a in items:
            target = dest / a["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            with api.http.stream("GET", a["url"]) as r:
                with open(target, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
    if as_json:
        return _emit(items)
    table = Table("name", "kind", "size", "sha256")
    for a in items:
        table.add_row(a["name"], a["kind"], str(a["size"]), a["sha256"][:12])
    console.print(table)


# -- reproductions ---------------------------------------------------------------
@main.command()
@click.argument("method_id")
@click.option("--seed", default=0, type=int)
@click.option("--smoke", is_flag=True, help="the seconds-long CI configuration")
@click.option("--submit", "as_job", is_flag=True, help="run it as a job on the server instead of in this process")
@click.option("--json", "as_json", is_flag=True)
def reproduce(method_id: str, seed: int, smoke: bool, as_job: bool, as_json: bool) -> None:
    """Run METHOD_ID's reproduction of its paper's claim and print the record."""
    if as_job:
        api = _api()
        job = api(
            "POST",
            "/api/v1/jobs",
            json={"method": method_id, "mode": "reproduce", "seed": seed, "params": {"smoke": smoke}},
        )
        final = _follow(api, job["id"], quiet=as_json)
        record = (final.get("result") or {}).get("reproduction")
    else:
        from api.numerics import pin_numerics

        pin_numerics()  # before torch loads: the record's numbers must not depend on this CPU's SIMD kernels
        from models.context import InMemoryRunContext
        from models.reproduction import get_reproduction, run_reproduction

        spec = get_reproduction(method_id)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            disable=as_json,
            transient=True,
        ) as bar:
            task = bar.add_task(method_id, total=None)
            ctx = InMemoryRunContext(
                seed=seed,
                on_progress=lambda d, t, m: bar.update(
                    task, completed=d, total=t or None, description=f"{method_id} {m}"
                ),
            )
            record = run_reproduction(spec, ctx, seed=seed, smoke=smoke)
    if as_json:
        return _emit(record)
    if record is None:
        sys.exit(1)
    verdict = "[green]holds[/]" if record["holds"] else "[red]does not hold[/]"
    console.print(f"{record['method']}: {record['claim']} — {verdict}")
    console.print(
        f"  {record['metric']}: ours {record['ours']:.4g} vs {record['baseline_name']} "
        f"{record['baseline']:.4g} ({record['direction']} is better; {record['seeds']} seed(s), "
        f"{record['seconds']:.1f}s)"
    )
    if record.get("note"):
        console.print(f"  note: {record['note']}")


@main.command()
@click.option("--only", default="*", help="shell-style patterns of method ids, comma-separated")
@click.option("--smoke", is_flag=True)
@click.option("--jobs", default=1, show_default=True, help="reproductions run at once, each on one thread")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/results.md"))
@click.option(
    "--render", "render_only", is_flag=True, help="rewrite the pages from the stored records without running anything"
)
def results(only: str, smoke: bool, jobs: int, out: Path, render_only: bool) -> None:
    """Re-run every reproduction (each in its own process) and regenerate docs/results.md and docs/methods/."""
    from api.results import regenerate, render_stored

    if render_only:
        render_stored(out)
        console.print(f"rewrote {out} and {out.parent / 'methods'} from {out.with_suffix('.json')}")
        return
    regenerate(out, pattern=only, smoke=smoke, console=console, jobs=jobs)


# -- deployments and demos ------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def deploy(ctx: click.Context, as_json: bool) -> None:
    """Serve registered models: `crucible deploy` lists deployments; see the subcommands."""
    if ctx.invoked_subcommand is not None:
        return
    items = _api()("GET", "/api/v1/deployments")["items"]
    if as_json:
        return _emit(items)
    table = Table("name", "kind", "model", "status", "warm")
    for d in items:
        table.add_row(d["name"], d["kind"], d["model"], d["status"], "yes" if d["loaded"] else "")
    console.print(table)


@deploy.command("create")
@click.argument("name")
@click.argument("model")
@click.option("-e", "--engine", "engine", multiple=True, help="engine option key=value, e.g. -e max_n=2")
@click.option("--json", "as_json", is_flag=True)
def deploy_create(name: str, model: str, engine: tuple[str, ...], as_json: bool) -> None:
    """Deploy MODEL (`name` or `name@version`) as NAME; it loads once and stays warm."""
    out = _api()(
        "POST", "/api/v1/deployments", json={"name": name, "model": model, "engine": _parse_params(engine)}, timeout=600
    )
    if as_json:
        return _emit(out)
    console.print(f"deployed [cyan]{out['name']}[/] ({out['kind']}, {out['model']})")


@deploy.command("delete")
@click.argument("name")
def deploy_delete(name: str) -> None:
    """Delete the deployment NAME (its model stays registered; the weights leave the server's memory)."""
    _api()("DELETE", f"/api/v1/deployments/{name}")
    console.print(f"deleted {name}")


@deploy.command("chat")
@click.argument("name")
@click.argument("message")
@click.option("--max-tokens", default=64, type=int)
@click.option("--seed", default=None, type=int)
def deploy_chat(name: str, message: str, max_tokens: int, seed: int | None) -> None:
    """Send one chat MESSAGE to the LLM deployment NAME and print the reply."""
    body = {"model": name, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens, "seed": seed}
    out = _api()("POST", "/v1/chat/completions", json=body, timeout=600)
    console.print(out["choices"][0]["message"]["content"])


SMOKE_BANNER = (
    "[yellow]smoke run[/]: {what}, and its numbers are not evidence (they check the plumbing); "
    "drop --smoke for the real demo (minutes)"
)


@main.group()
def demo() -> None:
    """End-to-end demos through the API (a running `crucible up`)."""


@demo.command("llm")
@click.option("--smoke", is_flag=True, help="seconds-sized jobs (CI)")
@click.option("--json", "as_json", is_flag=True)
def demo_llm(smoke: bool, as_json: bool) -> None:
    """Pretrain if missing → prune 50% → SquareHead → EoRA → deploy → one chat completion."""
    from api.demo import llm_demo

    api = _api()
    out = llm_demo(
        api,
        lambda job_id: _follow(api, job_id, quiet=True),
        lambda s: None if as_json else console.print(s),
        smoke=smoke,
    )
    if as_json:
        return _emit(out)
    if smoke:
        console.print(SMOKE_BANNER.format(what="a micro Llama trained for seconds: its reply is noise"))
    table = Table("stage", "model", "val ppl")
    for stage, ref, ppl in out["stages"]:
        table.add_row(stage, ref, "" if ppl is None else f"{ppl:.2f}")
    console.print(table)
    console.print(
        f"[bold]{out['deployment']}[/] replies: {out['reply']!r} ({out['usage']['completion_tokens']} tokens)"
    )


@demo.command("diffusion")
@click.option("--smoke", is_flag=True, help="seconds-sized jobs (CI)")
@click.option("--json", "as_json", is_flag=True)
def demo_diffusion(smoke: bool, as_json: bool) -> None:
    """Train the diffusion base if missing, render CFG-vs-APG grids as job artifacts, deploy the base, draw."""
    from api.demo import diffusion_demo

    api = _api()
    out = diffusion_demo(
        api,
        lambda job_id: _follow(api, job_id, quiet=True),
        lambda s: None if as_json else console.print(s),
        smoke=smoke,
    )
    if as_json:
        return _emit(out)
    if smoke:
        console.print(SMOKE_BANNER.format(what="a micro U-Net trained for seconds: its images are noise"))
    rec = out["record"]
    console.print(
        f"job [cyan]{out['job']}[/]: APG FD {rec['ours']:.4g} vs CFG {rec['baseline']:.4g} "
        f"({'holds' if rec['holds'] else 'does not hold'}); {rec['note']}"
    )
    # the dashboard's pages, not the API's artifact URLs: a browser has the dashboard's session, not a key
    console.print(f"  grids ({', '.join(out['artifacts'])}): {api.url}/#/jobs/{out['job']}")
    console.print(
        f"  deployed {out['model']} as [bold]{out['deployment']}[/] ({out['images']} APG images drawn): "
        f"{api.url}/#/deployments/{out['deployment']}"
    )


if __name__ == "__main__":
    main()
