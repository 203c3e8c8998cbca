#!/usr/bin/env node
// A command-line client of the inference core in Node.js: one ChatStream call,
// its reply printed as it is generated.
//
// It loads the proto at run time (no generated code), so it always speaks the
// contract in proto/llamachat/v1/chat.proto. Usage: see USAGE below or --help;
// clients/node/README.md says how to install and run it.

import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = fileURLToPath(new URL("../../proto", import.meta.url));
const PROTO_FILE = path.join("llamachat", "v1", "chat.proto");

const EXIT_OK = 0;
const EXIT_RPC_ERROR = 1; // the call ended with a gRPC status other than OK
const EXIT_USAGE = 2; // bad command line
const EXIT_INTERRUPTED = 130; // Ctrl-C (or SIGTERM): the call was cancelled

const USAGE = `\
Usage: node clients/node/chat.js [options] MESSAGE...

Sends MESSAGE (the arguments joined by spaces) to the llamachat inference core
with ChatStream and prints the reply as it is generated.

Options:
  --address HOST:PORT   the core's gRPC address, or unix:PATH
                        (default: env GRPC_ADDRESS, else localhost:50051)
  --session ID          continue (or create) session ID; default: a new session
  --max-tokens N        at most N tokens in the reply (default: the core's, 512)
  --temperature T       sampling temperature in [0, 2]; 0 is greedy (default 0.7)
  --top-p P             nucleus sampling mass in [0, 1] (default 0.9)
  --seed N              seed of the sampler, for reproducible sampling
  --api-key KEY         sent as "authorization: Bearer KEY" (default: env API_KEY)
  --json                print each stream message as one JSON line on stdout
  -h, --help            print this help

Output: the reply's text on stdout as it arrives, then on stderr one line
"session_id=... finish_reason=... prompt_tokens=... completion_tokens=...
cached_prompt_tokens=...". With --json, stdout has one JSON object per stream
message instead (the last one carries session_id, finish_reason and usage).

Exit status: 0 on success; 1 when the call fails (stderr: "error: CODE: details",
CODE the gRPC status name); 2 on a bad command line; 130 when interrupted.
`;

class UsageError extends Error {}

/** Parse the command line into the request and the connection settings. */
function parseCommandLine(argv, env) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        address: { type: "string" },
        session: { type: "string" },
        "max-tokens": { type: "string" },
        temperature: { type: "string" },
        "top-p": { type: "string" },
        seed: { type: "string" },
        "api-key": { type: "string" },
        json: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    return { help: true };
  }
  if (positionals.length === 0) {
    throw new UsageError("no MESSAGE given");
  }
  // Bounds (temperature in [0, 2], ...) are the core's to check: it answers
  // INVALID_ARGUMENT with the reason. Here only the types are checked, so
  // that nothing is silently truncated on the wire.
  const request = { message: positionals.join(" "), session_id: values.session ?? "" };
  if (values["max-tokens"] !== undefined) {
    request.max_tokens = integerOption("--max-tokens", values["max-tokens"], -(2 ** 31), 2 ** 31 - 1);
  }
  if (values.seed !== undefined) {
    request.seed = integerOption("--seed", values.seed, 0, 2 ** 32 - 1);
  }
  if (values.temperature !== undefined) {
    request.temperature = numberOption("--temperature", values.temperature);
  }
  if (values["top-p"] !== undefined) {
    request.top_p = numberOption("--top-p", values["top-p"]);
  }
  return {
    help: false,
    address: values.address ?? env.GRPC_ADDRESS ?? "localhost:50051",
    apiKey: values["api-key"] ?? env.API_KEY ?? "",
    json: values.json,
    request,
  };
}

function integerOption(name, text, min, max) {
  const value = Number(text);
  if (!/^[+-]?\d+$/.test(text.trim()) || value < min || value > max) {
    throw new UsageError(`${name} needs an integer from ${min} to ${max}, got ${JSON.stringify(text)}`);
  }
  return value;
}

function numberOption(name, text) {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) {
    throw new UsageError(`${name} needs a number, got ${JSON.stringify(text)}`);
  }
  return value;
}

/** The ChatService client class, from the proto read at run time. */
function loadChatService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).llamachat.v1.ChatService;
}

function isLastMessage(message) {
  return message.finish_reason !== "FINISH_REASON_UNSPECIFIED" || message.usage != null;
}

function summaryLine(last) {
  const usage = last.usage ?? {};
  return (
    `session_id=${last.session_id} finish_reason=${last.finish_reason} ` +
    `prompt_tokens=${usage.prompt_tokens ?? 0} completion_tokens=${usage.completion_tokens ?? 0} ` +
    `cached_prompt_tokens=${usage.cached_prompt_tokens ?? 0}`
  );
}

/**
 * Run one ChatStream call to its end and return the exit status. The call is
 * over when both its status has arrived and the stream has delivered every
 * message ('end'): grpc-js may emit the status while messages still wait in
 * the stream's buffer.
 */
function streamChat(ChatService, options) {
  const client = new ChatService(options.address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (options.apiKey) {
    metadata.set("authorization", `Bearer ${options.apiKey}`);
  }
  const call = client.ChatStream(options.request, metadata);

  let interrupted = false;
  const cancel = () => {
    interrupted = true;
    call.cancel();
  };
  process.once("SIGINT", cancel);
  process.once("SIGTERM", cancel);
  // A closed stdout (`| head`) is no reason to keep the model generating.
  process.stdout.on("error", cancel);

  let last = null;
  let printedText = false;
  call.on("data", (message) => {
    if (options.json) {
      process.stdout.write(`${JSON.stringify(message)}\n`);
    } else if (message.text) {
      process.stdout.write(message.text);
      printedText = true;
    }
    if (isLastMessage(message)) {
      last = message;
    }
  });
  // Failures also arrive as the status below; this listener only keeps the
  // 'error' event from being thrown.
  call.on("error", () => {});
  const status = new Promise((resolve) => call.on("status", resolve));
  const ended = new Promise((resolve) => call.on("end", resolve));

  return Promise.all([status, ended]).then(([finalStatus]) => {
    process.off("SIGINT", cancel);
    process.off("SIGTERM", cancel);
    client.close();
    if (printedText) {
      process.stdout.write("\n");
    }
    if (interrupted) {
      process.stderr.write("cancelled\n");
      return EXIT_INTERRUPTED;
    }
    if (finalStatus.code !== grpc.status.OK) {
      const name = grpc.status[finalStatus.code] ?? `code ${finalStatus.code}`;
      process.stderr.write(`error: ${name}: ${finalStatus.details}\n`);
      return EXIT_RPC_ERROR;
    }
    if (last === null) {
      process.stderr.write("error: the stream ended without its last message\n");
      return EXIT_RPC_ERROR;
    }
    if (!options.json) {
      process.stderr.write(`${summaryLine(last)}\n`);
    }
    return EXIT_OK;
  });
}

async function main() {
  let options;
  try {
    options = parseCommandLine(process.argv.slice(2), process.env);
  } catch (error) {
    if (!(error instanceof UsageError)) {
      throw error;
    }
    process.stderr.write(`chat.js: ${error.message}\nTry "node clients/node/chat.js --help".\n`);
    return EXIT_USAGE;
  }
  if (options.help) {
    process.stdout.write(USAGE);
    return EXIT_OK;
  }
  return streamChat(loadChatService(), options);
}

// exitCode, not exit(): stdout is flushed before the process ends.
process.exitCode = await main();
