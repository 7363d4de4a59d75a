-- Immich schema fixture: "plural" era with boolean visibility, Immich v1.120 (TypeORM migrations).
--
-- Tables: assets + asset_files (created in v1.113), visibility as booleans
-- (assets."isVisible", assets."isArchived"), asset_job_status has "previewAt"/"thumbnailAt",
-- file paths stored RELATIVE to the process working directory /usr/src/app
-- (e.g. 'upload/thumbs/<ownerId>/ab/cd/<assetId>-thumbnail.webp').
--
-- Only the tables the exporter reads are here. Left out on purpose: vector/extension
-- columns and tables, triggers, tables the exporter never reads, and the foreign keys
-- that point at those tables (assets."stackId" -> asset_stack, person."faceAssetId" -> asset_faces).
--
-- Sources (paths in immich-app/immich):
--   assets           server/src/schema/migrations/1744910873969-InitialMigration.ts (v1.132 state)
--                    minus "updateId" (server/src/migrations/1740586617223-AddUpdateIdColumns.ts, v1.12x);
--                    "previewPath"/"thumbnailPath" dropped by server/src/migrations/1724101822106-AddAssetFilesTable.ts;
--                    "status" added by server/src/migrations/1726593009549-AddAssetStatus.ts;
--                    checksum indexes from server/src/migrations/1715804005643-RemoveLibraryType.ts
--   asset_files      server/src/migrations/1724101822106-AddAssetFilesTable.ts
--                    (UNIQUE "UQ_assetId_type" ("assetId","type"), FK ON DELETE CASCADE; no "updateId" yet)
--   asset_job_status server/src/migrations/1699345863886-AddJobStatus.ts,
--                    1705094221536-AddMetadataExtractedAt.ts, 1711989989911-AddAssetDuplicateColumns.ts,
--                    1724080823160-AddThumbnailJobStatus.ts ("previewAt", "thumbnailAt")
--   users            InitialMigration.ts minus "updateId"; "profileChangedAt" from 1726491047923-AddprofileChangedAt.ts
--   libraries        InitialMigration.ts minus "updateId"
--   person           InitialMigration.ts minus "isFavorite" (1734879118272-AddIsFavoritePerson),
--                    "color" (1738889177573-AddPersonColor) and "updateId"
--   version_history  server/src/migrations/1727797340951-AddVersionHistory.ts
--   system_metadata  server/src/migrations/1700345818045-SystemMetadata.ts ("value" has no default, as in
--                    Immich's real v1.132.3 schema; this file gave it one until compared with it)
--   migrations       TypeORM's own migrations table
-- Compared with Immich's real v1.132.3 schema (../shared/immich-schema/v1.132.3.sql): the tables above
-- agree column for column apart from the later additions named here.

DO $$
BEGIN
  CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
EXCEPTION WHEN OTHERS THEN
  CREATE OR REPLACE FUNCTION uuid_generate_v4() RETURNS uuid LANGUAGE sql VOLATILE AS 'SELECT gen_random_uuid()';
END
$$;

CREATE TABLE "migrations" (
  "id"        SERIAL            NOT NULL,
  "timestamp" bigint            NOT NULL,
  "name"      character varying NOT NULL,
  CONSTRAINT "PK_8c82d7f526340ab734260ea46be" PRIMARY KEY ("id")
);

CREATE TABLE "users" (
  "id"                   uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "email"                character varying        NOT NULL,
  "password"             character varying        NOT NULL DEFAULT '',
  "createdAt"            timestamp with time zone NOT NULL DEFAULT now(),
  "profileImagePath"     character varying        NOT NULL DEFAULT '',
  "isAdmin"              boolean                  NOT NULL DEFAULT false,
  "shouldChangePassword" boolean                  NOT NULL DEFAULT true,
  "deletedAt"            timestamp with time zone,
  "oauthId"              character varying        NOT NULL DEFAULT '',
  "updatedAt"            timestamp with time zone NOT NULL DEFAULT now(),
  "storageLabel"         character varying,
  "name"                 character varying        NOT NULL DEFAULT '',
  "quotaSizeInBytes"     bigint,
  "quotaUsageInBytes"    bigint                   NOT NULL DEFAULT 0,
  "status"               character varying        NOT NULL DEFAULT 'active',
  "profileChangedAt"     timestamp with time zone NOT NULL DEFAULT now(),
  CONSTRAINT "PK_a3ffb1c0c8416b9fc6f907b7433" PRIMARY KEY ("id"),
  CONSTRAINT "UQ_97672ac88f789774dd47f7c8be3" UNIQUE ("email"),
  CONSTRAINT "UQ_b309cf34fa58137c416b32cea3a" UNIQUE ("storageLabel")
);

CREATE TABLE "libraries" (
  "id"                uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "name"              character varying        NOT NULL,
  "ownerId"           uuid                     NOT NULL,
  "importPaths"       text[]                   NOT NULL,
  "exclusionPatterns" text[]                   NOT NULL,
  "createdAt"         timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt"         timestamp with time zone NOT NULL DEFAULT now(),
  "deletedAt"         timestamp with time zone,
  "refreshedAt"       timestamp with time zone,
  CONSTRAINT "PK_505fedfcad00a09b3734b4223de" PRIMARY KEY ("id"),
  CONSTRAINT "FK_0f6fc2fb195f24d19b0fb0d57c1" FOREIGN KEY ("ownerId") REFERENCES "users" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TYPE "assets_status_enum" AS ENUM ('active', 'trashed', 'deleted');

CREATE TABLE "assets" (
  "id"               uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "deviceAssetId"    character varying        NOT NULL,
  "ownerId"          uuid                     NOT NULL,
  "deviceId"         character varying        NOT NULL,
  "type"             character varying        NOT NULL,
  "originalPath"     character varying        NOT NULL,
  "fileCreatedAt"    timestamp with time zone NOT NULL,
  "fileModifiedAt"   timestamp with time zone NOT NULL,
  "isFavorite"       boolean                  NOT NULL DEFAULT false,
  "duration"         character varying,
  "encodedVideoPath" character varying                 DEFAULT '',
  "checksum"         bytea                    NOT NULL,
  "isVisible"        boolean                  NOT NULL DEFAULT true,
  "livePhotoVideoId" uuid,
  "updatedAt"        timestamp with time zone NOT NULL DEFAULT now(),
  "createdAt"        timestamp with time zone NOT NULL DEFAULT now(),
  "isArchived"       boolean                  NOT NULL DEFAULT false,
  "originalFileName" character varying        NOT NULL,
  "sidecarPath"      character varying,
  "thumbhash"        bytea,
  "isOffline"        boolean                  NOT NULL DEFAULT false,
  "libraryId"        uuid,
  "isExternal"       boolean                  NOT NULL DEFAULT false,
  "deletedAt"        timestamp with time zone,
  "localDateTime"    timestamp with time zone NOT NULL,
  "stackId"          uuid,
  "duplicateId"      uuid,
  "status"           "assets_status_enum"     NOT NULL DEFAULT 'active',
  CONSTRAINT "PK_da96729a8b113377cfb6a62439c" PRIMARY KEY ("id"),
  CONSTRAINT "FK_2c5ac0d6fb58b238fd2068de67d" FOREIGN KEY ("ownerId") REFERENCES "users" ("id") ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT "FK_16294b83fa8c0149719a1f631ef" FOREIGN KEY ("livePhotoVideoId") REFERENCES "assets" ("id") ON UPDATE CASCADE ON DELETE SET NULL,
  CONSTRAINT "FK_9977c3c1de01c3d848039a6b90c" FOREIGN KEY ("libraryId") REFERENCES "libraries" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);
CREATE UNIQUE INDEX "UQ_assets_owner_library_checksum" ON "assets" ("ownerId", "libraryId", "checksum") WHERE "libraryId" IS NOT NULL;
CREATE UNIQUE INDEX "UQ_assets_owner_checksum" ON "assets" ("ownerId", "checksum") WHERE "libraryId" IS NULL;
CREATE INDEX "IDX_originalPath_libraryId" ON "assets" ("originalPath", "libraryId");
CREATE INDEX "IDX_2c5ac0d6fb58b238fd2068de67" ON "assets" ("ownerId");

CREATE TABLE "asset_files" (
  "id"        uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "assetId"   uuid                     NOT NULL,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt" timestamp with time zone NOT NULL DEFAULT now(),
  "type"      character varying        NOT NULL,
  "path"      character varying        NOT NULL,
  CONSTRAINT "PK_c41dc3e9ef5e1c57ca5a08a0004" PRIMARY KEY ("id"),
  CONSTRAINT "UQ_assetId_type" UNIQUE ("assetId", "type"),
  CONSTRAINT "FK_e3e103a5f1d8bc8402999286040" FOREIGN KEY ("assetId") REFERENCES "assets" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);
CREATE INDEX "IDX_asset_files_assetId" ON "asset_files" ("assetId");

CREATE TABLE "asset_job_status" (
  "assetId"              uuid NOT NULL,
  "facesRecognizedAt"    timestamp with time zone,
  "metadataExtractedAt"  timestamp with time zone,
  "duplicatesDetectedAt" timestamp with time zone,
  "previewAt"            timestamp with time zone,
  "thumbnailAt"          timestamp with time zone,
  CONSTRAINT "PK_420bec36fc02813bddf5c8b73d4" PRIMARY KEY ("assetId"),
  CONSTRAINT "FK_420bec36fc02813bddf5c8b73d4" FOREIGN KEY ("assetId") REFERENCES "assets" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE "person" (
  "id"            uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "createdAt"     timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt"     timestamp with time zone NOT NULL DEFAULT now(),
  "ownerId"       uuid                     NOT NULL,
  "name"          character varying        NOT NULL DEFAULT '',
  "thumbnailPath" character varying        NOT NULL DEFAULT '',
  "isHidden"      boolean                  NOT NULL DEFAULT false,
  "birthDate"     date,
  "faceAssetId"   uuid,
  CONSTRAINT "PK_5fdaf670315c4b7e70cce85daa3" PRIMARY KEY ("id"),
  CONSTRAINT "FK_5527cc99f530a547093f9e577b6" FOREIGN KEY ("ownerId") REFERENCES "users" ("id") ON UPDATE CASCADE ON DELETE CASCADE
);

CREATE TABLE "version_history" (
  "id"        uuid                     NOT NULL DEFAULT uuid_generate_v4(),
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "version"   character varying        NOT NULL,
  CONSTRAINT "PK_5db259cbb09ce82c0d13cfd1b23" PRIMARY KEY ("id")
);

CREATE TABLE "system_metadata" (
  "key"   character varying NOT NULL,
  "value" jsonb             NOT NULL,
  CONSTRAINT "PK_fa94f6857470fb5b81ec6084465" PRIMARY KEY ("key")
);

-- A few of the rows a real v1.120 install has (TypeORM stores the class name).
INSERT INTO "migrations" ("timestamp", "name") VALUES
  (1699345863886, 'AddJobStatus1699345863886'),
  (1715804005643, 'RemoveLibraryType1715804005643'),
  (1724080823160, 'AddThumbnailJobStatus1724080823160'),
  (1724101822106, 'AddAssetFilesTable1724101822106'),
  (1725258039306, 'UpsertMissingAssetJobStatus1725258039306'),
  (1726491047923, 'AddprofileChangedAt1726491047923'),
  (1726593009549, 'AddAssetStatus1726593009549'),
  (1727797340951, 'AddVersionHistory1727797340951');
