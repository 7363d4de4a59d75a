"""What each Immich release's HTTP API looks like to an API key: which routes exist, what each one
requires, which queues and job names it has. Pure data; the simulated API (``api.py``) and the exporter's
own key check (``sources/immich_access.py``, which copies none of this) are tested against each other.

Sources (repository ``immich-app/immich`` unless said otherwise; "SDK x" = the ``@immich/sdk`` npm package
of that release, generated from that release's ``open-api/immich-openapi-specs.json``):

* ``server/src/services/auth.service.ts`` ``authenticate()``: the key is checked first (401 ``Invalid API
  key``; ``Invalid user token`` is the session text), then the admin flag (403 ``Forbidden``), then the
  route's permission (403 ``Missing required permission: <name>``). A key with ``all`` passes every
  permission check (``utils/access.ts`` ``isGranted``). ``permission: false`` skips the check.
* PR #20113 "fix: default route permission" (v1.136.0): ``metadata.permission ?? Permission.All``, so a
  route that declares no permission requires ``all`` from an API key; before it such a route let any key
  through. Issue reports against v1.136.0/v1.137.3 ("Missing required permission: all") confirm the text.
* PR #20250 "feat!: more permissions" (v1.137.0): ``user.read`` on ``GET /users/me``, ``job.read`` /
  ``job.create`` on the job routes. SDK 1.135.3's ``Permission`` enum has no ``user.read``, ``job.read`` or
  ``job.create`` at all; SDK 1.138.0's has them.
* ``server/src/controllers/asset.controller.ts``: ``POST /assets/jobs`` is ``@Authenticated()`` (declares
  nothing) in every upstream copy read up to the v2 line (OCR and asset-copy era); 3.2.0-rc.0's OpenAPI
  spec declares ``x-immich-permission: job.create``. No v3.0/v3.1 copy was found: those are modelled as the
  v2 line (``all``), and the boundary is the least certain row here.
* ``GET /api-keys/me`` (``api-key.controller.ts``, ``permission: false``): absent from SDK 1.138.0, present
  in SDK 2.4.0. Before it, ``/api-keys/me`` is ``GET /api-keys/:id`` (``apiKey.read``), whose UUID check
  answers 400 ``id must be a UUID``.
* ``GET /queues`` (admin, ``queue.read``): first in SDK 2.4.0; ``GET /jobs`` (admin) stays as
  ``getQueuesLegacy`` through SDK 3.2.2.
* ``ServerVersionResponseDto.prerelease``: first in SDK 3.0.0.
* Queue names: SDK ``QueueName`` (2.4.0: 17, 2.7.5: 18 with ``editor``, 3.x: 19 with ``integrityCheck``);
  before 2.4 the keys of ``AllJobStatusResponseDto`` (15, SDK 1.135.3 and 1.138.0).
* Job names: ``generate-thumbnails`` / ``generate-person-thumbnail`` in ``server/src/enum.ts`` before the
  PascalCase rename (v1.137, per the project's Immich facts), ``AssetGenerateThumbnails`` /
  ``PersonGenerateThumbnail`` after (SDK 2.4.0 to 3.2.2 ``JobName``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A route's declared permission: a name, ``False`` (declared as none needed), or ``None`` (declares
# nothing, so the release's default applies).
Declared = str | bool | None

QUEUES_V1 = ("backgroundTask", "backupDatabase", "duplicateDetection", "faceDetection", "facialRecognition",
             "library", "metadataExtraction", "migration", "notifications", "search", "sidecar", "smartSearch",
             "storageTemplateMigration", "thumbnailGeneration", "videoConversion")
QUEUES_V2_4 = ("thumbnailGeneration", "metadataExtraction", "videoConversion", "faceDetection", "facialRecognition",
               "smartSearch", "duplicateDetection", "backgroundTask", "storageTemplateMigration", "migration",
               "search", "sidecar", "library", "notifications", "backupDatabase", "ocr", "workflow")
QUEUES_V2_7 = (*QUEUES_V2_4, "editor")
QUEUES_V3 = (*QUEUES_V2_4, "integrityCheck", "editor")


@dataclass(frozen=True)
class Release:
    tag: str
    version: tuple[int, int, int]
    # What a route that declares no permission asks of an API key (auth.service.ts): None before
    # PR #20113, "all" from v1.136.
    default_permission: str | None
    more_permissions: bool  # PR #20250 (v1.137): user.read, job.read exist and are declared
    asset_jobs_permission: str | None  # declared on POST /assets/jobs
    api_keys_me: bool
    queues_route: bool
    prerelease: bool
    queues: tuple[str, ...]
    asset_job: str
    person_job: str

    @property
    def label(self) -> str:
        return "v{}.{}.{}".format(*self.version)


RELEASES: tuple[Release, ...] = (
    Release("v1.132.3", (1, 132, 3), None, False, None, False, False, False, QUEUES_V1,
            "generate-thumbnails", "generate-person-thumbnail"),
    Release("v1.135.3", (1, 135, 3), None, False, None, False, False, False, QUEUES_V1,
            "generate-thumbnails", "generate-person-thumbnail"),
    # PR #20113 lands: an undeclared route requires "all"; users/me and the job routes declare nothing yet.
    Release("v1.136.0", (1, 136, 0), "all", False, None, False, False, False, QUEUES_V1,
            "generate-thumbnails", "generate-person-thumbnail"),
    Release("v1.137.3", (1, 137, 3), "all", True, None, False, False, False, QUEUES_V1,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
    Release("v2.4.1", (2, 4, 1), "all", True, None, True, True, False, QUEUES_V2_4,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
    Release("v2.7.5", (2, 7, 5), "all", True, None, True, True, False, QUEUES_V2_7,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
    Release("v3.0.0", (3, 0, 0), "all", True, None, True, True, True, QUEUES_V3,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
    Release("v3.1.0", (3, 1, 0), "all", True, None, True, True, True, QUEUES_V3,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
    Release("v3.2.2", (3, 2, 2), "all", True, "job.create", True, True, True, QUEUES_V3,
            "AssetGenerateThumbnails", "PersonGenerateThumbnail"),
)


def release_for(version: tuple[int, int, int] | str) -> Release:
    """The newest known release at or before ``version`` (``(2, 4, 1)``, ``"v2.4"``, ``"2.4.1"``)."""
    if isinstance(version, str):
        parts = [*(int(p) for p in re.findall(r"\d+", version)[:3]), 0, 0, 0]
        version = parts[0], parts[1], parts[2]
    known = [r for r in RELEASES if r.version[:2] <= version[:2]]
    if not known:
        raise ValueError(f"no simulated Immich release at or before {version}")
    return known[-1]


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    pattern: str  # a regular expression on the path
    declared: Declared = None
    admin: bool = False
    public: bool = False


def routes(release: Release) -> list[Route]:
    """The routes this simulation serves, as ``release`` declares them; any other path is a 404."""
    more = release.more_permissions
    out = [
        Route("ping", "GET", r"/api/server/ping", public=True),
        Route("version", "GET", r"/api/server/version", public=True),
        # user.controller.ts: declared user.read from PR #20250; nothing before (then, from v1.136, "all").
        Route("me", "GET", r"/api/users/me", "user.read" if more else None),
        # job.controller.ts / queue.controller.ts (getQueuesLegacy from 2.4): admin; job.read from PR #20250.
        Route("jobs", "GET", r"/api/jobs", "job.read" if more else None, admin=True),
        # asset.controller.ts runAssetJobs.
        Route("asset_jobs", "POST", r"/api/assets/jobs", release.asset_jobs_permission),
        # person.controller.ts updatePerson: person.update in every release modelled here.
        Route("person_update", "PUT", r"/api/people/(?P<id>[^/]+)", "person.update"),
    ]
    if release.queues_route:
        out.append(Route("queues", "GET", r"/api/queues", "queue.read", admin=True))
    if release.api_keys_me:
        out.append(Route("api_key_me", "GET", r"/api/api-keys/me", False))
    # api-key.controller.ts getApiKey: before /me existed, "me" is taken for an id.
    out.append(Route("api_key", "GET", r"/api/api-keys/(?P<id>[^/]+)", "apiKey.read"))
    return out


def required(release: Release, route: Route) -> str | None:
    """The permission an API key needs for ``route`` on ``release`` (None: any valid key)."""
    if route.declared is False:
        return None
    if isinstance(route.declared, str):
        return route.declared
    return release.default_permission


def granted(permissions: tuple[str, ...] | list[str], wanted: str | None) -> bool:
    """``utils/access.ts`` ``isGranted``: ``all`` grants everything."""
    return wanted is None or "all" in permissions or wanted in permissions
