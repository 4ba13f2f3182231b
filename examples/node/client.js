// Calls the moemesh Gateway from Node.js with @grpc/grpc-js: a streamed GenerateStream, then two turns of a
// streamed Chat (one session). Prints the text as it comes, then one summary line per call with its token
// ids, which tests/test_node_example.py compares with the Python client's.
//
//   npm ci && node client.js --address 127.0.0.1:50051 --prompt "Hello" --max-new-tokens 16
//   (--api-key KEY, or $MOEMESH_API_KEY; --tls-ca ca.pem for a TLS gateway)
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");

const { values: args } = parseArgs({
  options: {
    address: { type: "string", default: "127.0.0.1:50051" },
    prompt: { type: "string", default: "Hello" },
    "max-new-tokens": { type: "string", default: "16" },
    "api-key": { type: "string", default: process.env.MOEMESH_API_KEY ?? "" },
    "tls-ca": { type: "string" },
  },
});

// keepCase: fields keep their proto names (token_ids, finish_reason), as in every other language's client.
const definition = protoLoader.loadSync("moemesh/v1/gateway.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: String,
  defaults: true,
});
const { Gateway } = grpc.loadPackageDefinition(definition).moemesh.v1;

const credentials = args["tls-ca"]
  ? grpc.credentials.createSsl(readFileSync(args["tls-ca"]))
  : grpc.credentials.createInsecure();
const client = new Gateway(args.address, credentials);

function metadata() {
  const md = new grpc.Metadata();
  if (args["api-key"]) md.set("authorization", `Bearer ${args["api-key"]}`);
  return md;
}

const sampling = { max_new_tokens: Number(args["max-new-tokens"]), temperature: 0 };

// Streams one call's responses to stdout; resolves with the token ids, finish reason and session id.
function collect(call) {
  return new Promise((resolve, reject) => {
    const reply = { token_ids: [], finish_reason: "", session_id: "" };
    call.on("data", (response) => {
      process.stdout.write(response.text);
      reply.token_ids.push(...response.token_ids);
      reply.finish_reason = response.finish_reason || reply.finish_reason;
      reply.session_id = response.session_id || reply.session_id;
    });
    call.on("error", reject); // a grpc.ServiceError: .code (grpc.status) and .details
    call.on("end", () => {
      process.stdout.write("\n");
      resolve(reply);
    });
  });
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

async function main() {
  const generated = await collect(
    client.GenerateStream({ prompt: args.prompt, sampling }, metadata(), deadline(120)),
  );
  console.log(`generate token_ids=${JSON.stringify(generated.token_ids)} finish_reason=${generated.finish_reason}`);

  let session_id = "";
  for (const content of [args.prompt, "And then?"]) {
    const request = { session_id, messages: [{ role: "user", content }], sampling };
    const reply = await collect(client.Chat(request, metadata(), deadline(120)));
    session_id = reply.session_id;
    console.log(`chat session_id=${session_id} token_ids=${JSON.stringify(reply.token_ids)}`);
  }
}

main()
  .catch((error) => {
    console.error(`error: ${grpc.status[error.code] ?? error.code}: ${error.details ?? error.message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
