// A Node BullMQ worker, configured the way Immich configures its own, for the queue tests.
//
// Environment:
//   REDIS_URL      redis://host:port/db (required)
//   QUEUE          queue name (default thumbnailGeneration)
//   PREFIX         key prefix (default immich_bull)
//   RETURN_VALUE   JSON value every job returns (default "success"); the string "throw" makes jobs fail
//   IMMICH         "1": behave as Immich's processor does (its JobRun event emitter): run the handler,
//                  catch and log its errors, return nothing, so every job completes with null. The
//                  handler writes an asset's files from WRITE_PLAN and throws "Input file is missing"
//                  for any other asset, as a thumbnail job whose original is gone does.
//   WRITE_PLAN     JSON file {"<assetId>": [["<absolute path>", "<base64 content>"], ...]} (IMMICH=1)
//   WORKER_NAME    optional worker name (BullMQ appends ":w:<name>" to the connection name, as Immich v3's
//                  named workers have it)
//   CONCURRENCY    jobs run at once (default 1); a worker still has one named connection whatever it is
//   JOB_DELAY_MS   how long each job takes (default 0)
//
// Prints "ready" on stdout once the worker's connection is up, "done <jobId>" per finished job, and
// exits 0 on SIGTERM after closing the worker.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { Worker } from 'bullmq';

const url = process.env.REDIS_URL;
if (!url) {
  console.error('REDIS_URL is required');
  process.exit(2);
}
const parsed = new URL(url);
const connection = {
  host: parsed.hostname,
  port: Number(parsed.port || 6379),
  db: Number((parsed.pathname || '/0').slice(1) || 0),
  password: parsed.password ? decodeURIComponent(parsed.password) : undefined,
  maxRetriesPerRequest: null,
};
const queue = process.env.QUEUE || 'thumbnailGeneration';
const prefix = process.env.PREFIX || 'immich_bull';
const raw = process.env.RETURN_VALUE ?? '"success"';
const delay = Number(process.env.JOB_DELAY_MS || 0);
const immich = process.env.IMMICH === '1';
const plan = process.env.WRITE_PLAN ? JSON.parse(readFileSync(process.env.WRITE_PLAN, 'utf8')) : {};

const opts = { connection, prefix, concurrency: Number(process.env.CONCURRENCY || 1) };
if (process.env.WORKER_NAME) {
  opts.name = process.env.WORKER_NAME;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The thumbnail handler of this pretend Immich: writes what the plan says, or fails.
const handler = async (job) => {
  const files = plan[job.data?.id];
  if (!files) {
    throw new Error(`Input file is missing: ${job.data?.id}`);
  }
  for (const [path, content] of files) {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, Buffer.from(content, 'base64'));
  }
  return 'success';
};

const worker = new Worker(
  queue,
  async (job) => {
    if (delay > 0) {
      await sleep(delay);
    }
    if (immich) {
      try {
        await handler(job);
      } catch (error) {
        console.error(`Unable to run job handler (${job.name}): ${error}`);
      }
      return undefined;
    }
    if (raw === 'throw') {
      throw new Error('thrown by the test worker');
    }
    return JSON.parse(raw);
  },
  opts,
);

worker.on('ready', () => console.log('ready'));
worker.on('completed', (job) => console.log(`done ${job.id}`));
worker.on('failed', (job) => console.log(`done ${job?.id}`));
worker.on('error', (err) => console.error(`worker error: ${err}`));

const stop = async () => {
  await worker.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
