"""The words the exporter speaks: label values, job names, queue names and states, in one place.

Config validation, CLI choices, HTTP filters, metric families and reports all take their values from
here, so a new kind or reason is added once and cannot drift between them.
"""

from __future__ import annotations

# Thumbnail-type files an asset can have (``asset_file.type``), the ``kind`` label.
KINDS = ("thumbnail", "preview", "fullsize")
# Kinds whose absence Immich's "Missing" rule looks at for every eligible asset (fullsize only for some).
RECORD_KINDS = ("thumbnail", "preview")
# Why a file counts as missing, the ``reason`` label: first the database's view, then the disk's.
REASONS = ("no_record", "file_missing", "file_empty", "file_corrupt", "file_unreadable")
FILE_REASONS = tuple(r for r in REASONS if r != "no_record")

# Face (person) thumbnails: ``person."thumbnailPath"``, judged by the same file rule as an asset's files.
# A problem row of this kind names the person (``Problem.asset_id`` holds the person's id); it is never
# an asset's kind (``KINDS``), so nothing that asks Immich for an asset's thumbnails ever sees it.
PERSON_KIND = "person"
# Every ``kind`` a problem row (``/problems``, ``scan``) can have.
PROBLEM_KINDS = (*KINDS, PERSON_KIND)
# ``immich_person_thumbnails_missing{reason}``: a person's row always names a path (Immich's "Missing"
# job already remakes the ones whose path is ``''``), so only the disk's reasons apply.
PERSON_REASONS = FILE_REASONS
# The job that writes a face thumbnail, on the thumbnail queue, data ``{"id": <personId>}`` (v1.137+; the
# same job was ``generate-person-thumbnail`` before).
PERSON_THUMBNAIL_JOB = "PersonGenerateThumbnail"
PERSON_THUMBNAIL_JOB_NAMES = frozenset({PERSON_THUMBNAIL_JOB, "generate-person-thumbnail"})

# BullMQ job states as the ``state`` label names them (Immich's API has no "prioritized" count).
QUEUE_STATES = ("waiting", "active", "delayed", "prioritized", "paused", "failed", "completed")

# Immich's queue names (``QueueName``), all eras: checked directly besides what SCAN finds.
KNOWN_QUEUES = (
    "thumbnailGeneration", "metadataExtraction", "videoConversion", "faceDetection", "facialRecognition",
    "smartSearch", "duplicateDetection", "backgroundTask", "storageTemplateMigration", "migration", "search",
    "sidecar", "library", "notifications", "backupDatabase", "ocr", "workflow", "editor",
    # v3.0+: Immich's own integrity checks (missing, untracked and checksum-mismatched files).
    "integrityCheck",
)
THUMBNAIL_QUEUE = "thumbnailGeneration"

# Per-asset thumbnail jobs through the eras, data ``{"id": <assetId>}`` (face thumbnails and queue-all
# jobs are not per asset).
THUMBNAIL_JOB_NAMES = frozenset({"AssetGenerateThumbnails", "generate-thumbnails", "generate-preview",
                                 "generate-thumbnail", "generate-webp-thumbnail", "generate-jpeg-thumbnail"})

EDITOR_QUEUE = "editor"
# Per-asset thumbnail jobs by the queue that carries them: the jobs whose outcome the exporter verifies.
# Face thumbnails (``PersonGenerateThumbnail``) and queue-all jobs name no asset and are left out.
EDIT_THUMBNAIL_JOB = "AssetEditThumbnailGeneration"
THUMBNAIL_JOBS_BY_QUEUE = {
    THUMBNAIL_QUEUE: THUMBNAIL_JOB_NAMES,
    EDITOR_QUEUE: frozenset({EDIT_THUMBNAIL_JOB}),
}

# ``immich_thumbnail_jobs_verified_total{result}``: what a finished thumbnail job left behind.
WRITTEN = "written"  # every thumbnail-type file the asset should have is there and sound
NO_EFFECT = "no_effect"  # the job finished and a file is still missing or broken
ASSET_MISSING = "asset_missing"  # the job named an asset that is not (or no longer) one to make thumbnails for
NOT_CHECKED = "not_checked"  # the job's asset was not learned in time, or the check was shed under load
VERIFY_RESULTS = (WRITTEN, NO_EFFECT, ASSET_MISSING, NOT_CHECKED)

# Per-asset jobs of any queue: their ``data.id`` is an asset id. Person and face jobs
# (``PersonGenerateThumbnail``, ``FacialRecognition``) carry other ids; deletions are not checked.
ASSET_JOBS = frozenset({
    # v1.137+
    "AssetGenerateThumbnails", "AssetExtractMetadata", "AssetEncodeVideo", "AssetDetectFaces",
    "AssetDetectDuplicates", "SmartSearch", "SidecarCheck", "SidecarWrite", "SidecarSync",
    "StorageTemplateMigrationSingle", "Ocr", "AssetEditThumbnailGeneration", "AssetFileMigration",
    # before v1.137
    "generate-preview", "generate-thumbnail", "generate-thumbnails", "generate-jpeg-thumbnail",
    "generate-webp-thumbnail", "generate-thumbhash-thumbnail", "metadata-extraction", "video-conversion",
    "smart-search", "encode-clip", "face-detection", "duplicate-detection", "sidecar-sync", "sidecar-write",
    "sidecar-check", "storage-template-migration-single", "link-live-photos",
})
NOT_ASSET_JOBS = frozenset({"AssetDelete", "AssetDeleteCheck"})


def is_asset_job(name: str | None) -> bool:
    if not name or name in NOT_ASSET_JOBS or name.endswith("QueueAll"):
        return False
    return name in ASSET_JOBS or (name.startswith("Asset") and name[5:6].isupper())


# A status a job's return value may carry (``immich_jobs_finished_total{outcome}``).
JOB_STATUSES = ("success", "skipped", "failed")
# Every ``outcome``: ``completed`` = finished with no status reported (Immich's processor returns nothing),
# a status where a server passes one, ``error`` = thrown (a BullMQ ``failed`` event).
COMPLETED = "completed"
ERROR = "error"
JOB_OUTCOMES = (COMPLETED, *JOB_STATUSES, ERROR)

# Regeneration: a request's result (``immich_regeneration_requests_total{result}``) and what checking the
# asset afterwards found (``immich_regeneration_verified_total{result}``, the ledger, the reports).
REQUEST_RESULTS = ("accepted", "rejected", "error")
VERIFIED_RESULTS = ("fixed", "still_missing", "not_queued", "gave_up")
# Why an asset is still broken after a request, as far as the exporter can see (ledger ``why``, reports).
WHY = (
    "not_queued",  # Immich answered 204 and no job naming the asset appeared in the queue
    "queue_paused",  # its job waits in a paused queue
    "no_worker",  # its job waits in a queue with no live worker
    "job_waiting",  # its job waits; workers are attached (or their count cannot be read)
    "job_delayed",  # its job waits for a retry after an error
    "job_stalled",  # its job is active and no worker holds its lock
    "job_active",  # its job is running
    "job_failed",  # its job ended in BullMQ's failed set
    "no_effect",  # its job finished (or left the queue) and the files are still missing
    "no_job",  # no job names it in the queue
    "queue_unknown",  # Redis is not configured or could not be read
    # Its original (a face thumbnail: its feature face's asset's original) is why (``remediation/original.py``).
    "original_missing", "original_unreadable", "original_corrupt", "original_checksum_mismatch",
    "no_face",  # a person with no feature face: Immich has nothing to crop its thumbnail from
)

# Why an asset is still broken, as its original says (``remediation/original.py``): the original read once,
# inside the media root, for the few assets still broken after their attempts. The ``original_*`` codes
# other than ``original_ok`` and ``original_unchecked`` are reasons regeneration cannot fix the asset.
ORIGINAL_OK = "original_ok"  # there, readable, an image or video by its header, its SHA-1 the asset's checksum
ORIGINAL_MISSING = "original_missing"  # no file at the asset's originalPath
ORIGINAL_UNREADABLE = "original_unreadable"  # there, and cannot be read (permissions, I/O error, not a file)
ORIGINAL_CORRUPT = "original_corrupt"  # empty, or its first bytes are neither an image nor a video
ORIGINAL_CHECKSUM_MISMATCH = "original_checksum_mismatch"  # its content's SHA-1 is not asset.checksum
ORIGINAL_UNCHECKED = "original_unchecked"  # not read: outside the media root, or no answer in time
ORIGINAL_RESULTS = (ORIGINAL_OK, ORIGINAL_MISSING, ORIGINAL_UNREADABLE, ORIGINAL_CORRUPT, ORIGINAL_CHECKSUM_MISMATCH,
                    ORIGINAL_UNCHECKED)
# The codes that explain why regenerating cannot help.
ORIGINAL_BROKEN = (ORIGINAL_MISSING, ORIGINAL_UNREADABLE, ORIGINAL_CORRUPT, ORIGINAL_CHECKSUM_MISMATCH)

# Immich v3's own integrity report (table ``integrity_report``): its entry types, the ``type`` label.
INTEGRITY_TYPES = ("missing_file", "untracked_file", "checksum_mismatch")
# The ``kind`` label of an entry that names no ``asset_file`` row: ``original`` when it names an asset
# (its original file, missing or failing its checksum), ``unknown`` when it names nothing (an untracked
# file: Immich records only its path, and the exporter does not guess a kind from a file name).
ORIGINAL_KIND = "original"
UNKNOWN_KIND = "unknown"
# The series always present where the table exists, 0 when Immich reported none of them.
INTEGRITY_SERIES = (
    *(("missing_file", kind) for kind in (*KINDS, ORIGINAL_KIND)),
    ("untracked_file", UNKNOWN_KIND),
    ("checksum_mismatch", ORIGINAL_KIND),
)
