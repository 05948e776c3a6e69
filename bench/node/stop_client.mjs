// Stop-to-halt from a Node grpc-js client (issue 17): not every client is Python.
//
// The same scenario as bench/scenarios.py stop_latency: start a `ticker` operation through the
// gateway (StartAndStream), wait for its first output chunk, pause a random moment inside the
// step, send StopOperation, and time the call's return (ack) and stop sent -> terminal event
// received on the stream (halt). The protos are loaded from protos/ at run time; the client
// authenticates like any client, with `authorization: Bearer <token>` call metadata.
//
//   node stop_client.mjs '{"address": "127.0.0.1:50052", "token": "stl_...", "own_connection": false}'
//
// The harness (bench/node_client.py) drives it one trial at a time, so that it can pair each
// trial with floor trials at the same moment: it prints {"versions": ...} once ready, then reads
// one line per trial, {"step_seconds": 1.0, "pause_seconds": 0.2}, and answers each with one
// line, {"ack_ms": ..., "halt_ms": ..., "mid_step": true}. It exits when its input ends.

import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const protos = join(here, "..", "..", "protos");
const TERMINAL = new Set(["completed", "failed", "interrupted"]);

const definition = protoLoader.loadSync("stopline/gateway/v1/gateway_service.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: false,
  oneofs: true,
});
const GatewayService = grpc.loadPackageDefinition(definition).stopline.gateway.v1.GatewayService;

function client(address, ownConnection) {
  // grpc-js, like gRPC core, shares one connection between channels to the same address unless
  // told to keep a subchannel pool of its own.
  const options = ownConnection ? { "grpc.use_local_subchannel_pool": 1 } : {};
  return new GatewayService(address, grpc.credentials.createInsecure(), options);
}

function numberStruct(values) {
  const fields = {};
  // The well-known types come from protobufjs's bundled descriptors, in camelCase.
  for (const [key, value] of Object.entries(values)) fields[key] = { numberValue: value };
  return { fields };
}

function version(pkg) {
  const path = join(here, "node_modules", pkg, "package.json");
  return JSON.parse(readFileSync(path, "utf8")).version;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A stream's messages as an async queue, so the trial can read "until X" twice.
function reader(call) {
  const queue = [];
  const waiting = [];
  let ended = null;
  const deliver = (item) => (waiting.length ? waiting.shift()(item) : queue.push(item));
  call.on("data", (message) => deliver({ message }));
  call.on("error", (error) => deliver({ error }));
  call.on("end", () => {
    ended = { end: true };
    deliver(ended);
  });
  return () =>
    new Promise((resolve) => {
      if (queue.length) resolve(queue.shift());
      else if (ended && !queue.length) resolve(ended);
      else waiting.push(resolve);
    });
}

async function trial(streamer, stopper, metadata, stepSeconds, pauseSeconds) {
  const call = streamer.StartAndStream(
    {
      agent: "ticker",
      input: numberStruct({
        steps: 2,
        step_seconds: stepSeconds,
        chunk_interval_seconds: Math.max(stepSeconds / 4, 0.005),
      }),
      cancel_policy: "CANCEL_POLICY_KEEP_RUNNING",
    },
    metadata,
  );
  const next = reader(call);
  let operationId = "";
  for (;;) {
    const item = await next();
    if (item.error || item.end) throw item.error ?? new Error("stream ended before a chunk");
    const m = item.message;
    if (m.update === "accepted") operationId = m.accepted.operation_id;
    if (m.update === "event" && m.event.kind === "output_chunk") break;
  }
  await sleep(pauseSeconds * 1000);
  const began = performance.now();
  const ackAt = await new Promise((resolve, reject) =>
    stopper.StopOperation({ operation_id: operationId, reason: "bench" }, metadata, (err) =>
      err ? reject(err) : resolve(performance.now()),
    ),
  );
  for (;;) {
    const item = await next();
    if (item.error || item.end) throw item.error ?? new Error("stream ended before the terminal");
    const m = item.message;
    if (m.update === "event" && TERMINAL.has(m.event.kind)) {
      const haltAt = performance.now();
      call.cancel();
      const interrupted = m.event.kind === "interrupted" ? m.event.interrupted : null;
      return {
        ack_ms: ackAt - began,
        halt_ms: haltAt - began,
        mid_step: Boolean(interrupted && interrupted.mid_step),
      };
    }
  }
}

async function main() {
  const args = JSON.parse(process.argv[2]);
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${args.token}`);
  const streamer = client(args.address, false);
  const stopper = args.own_connection ? client(args.address, true) : streamer;
  const versions = {
    node: process.versions.node,
    "@grpc/grpc-js": version("@grpc/grpc-js"),
    "@grpc/proto-loader": version("@grpc/proto-loader"),
  };
  process.stdout.write(`${JSON.stringify({ versions })}\n`);
  try {
    for await (const line of createInterface({ input: process.stdin })) {
      if (!line.trim()) continue;
      const asked = JSON.parse(line);
      const result = await trial(streamer, stopper, metadata, asked.step_seconds, asked.pause_seconds);
      process.stdout.write(`${JSON.stringify(result)}\n`);
    }
  } finally {
    streamer.close();
    if (stopper !== streamer) stopper.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exit(1);
});
