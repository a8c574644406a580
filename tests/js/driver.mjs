// Drives our AI SDK route with the `ai` package's own client code (AbstractChat,
// DefaultChatTransport, readUIMessageStream), for tests/integration/test_ai_sdk.py.
//
//   node driver.mjs chat   '<json options>'   send a user message, optionally drop or cancel, optionally resume
//   node driver.mjs resume '<json options>'   a fresh chat (a reloaded page) resuming the running answer
//   node driver.mjs read   < body.sse         read a UI message stream body from stdin (readUIMessageStream)
//
// Options: baseUrl, key, conversationId, text, messageId, initialMessages, body (extra body fields),
// dropAfter (end the connection with a network error after N data frames), cancelAfter (after N
// data frames, cancel the answer through POST /api/generations/{id}/cancel), resume (true: after a
// drop, resume through chat.resumeStream() as useChat does).
// Prints one JSON object: the chat's messages, status, error, onFinish calls and, per HTTP
// request, its status, headers of interest and the data frames received.

import { AbstractChat, DefaultChatTransport, readUIMessageStream } from "ai";

const TIMEOUT_MS = 30_000;

class State {
  // A ChatState like the framework bindings' (React, Vue, Svelte), without rendering.
  constructor(messages = []) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage(message) {
    this.messages = [...this.messages, this.snapshot(message)];
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
  }
  snapshot(value) {
    return value === undefined ? value : structuredClone(value);
  }
}

// fetch that records every response's data frames and can cut or cancel the answer.
function recordingFetch(options, connections) {
  return async (url, init) => {
    const response = await fetch(url, init);
    const record = {
      url: String(url),
      method: init?.method ?? "GET",
      status: response.status,
      contentType: response.headers.get("content-type"),
      uiMessageStream: response.headers.get("x-vercel-ai-ui-message-stream"),
      frames: [],
      dropped: false,
    };
    connections.push(record);
    if (!response.body || response.status === 204) return response;
    const first = connections.filter((c) => c.method === "POST").length === 1 && record.method === "POST";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    let buffer = "";
    let count = 0;
    let generationId;
    const body = new ReadableStream({
      async pull(controller) {
        for (;;) {
          const end = buffer.indexOf("\n\n");
          if (end >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = frame.split("\n").filter((line) => line.startsWith("data: ")).map((l) => l.slice(6));
            if (data.length === 0) continue; // a comment (`: ok`, `: ping`)
            const payload = data.join("\n");
            const chunk = payload === "[DONE]" ? payload : JSON.parse(payload);
            record.frames.push(chunk);
            if (chunk.type === "start") generationId = chunk.messageMetadata?.generationId;
            controller.enqueue(encoder.encode(frame + "\n\n"));
            count += 1;
            if (first && options.cancelAfter === count) {
              // What a stop button does: our cancel; the stream then ends with `abort`.
              const cancel = await fetch(`${options.baseUrl}/api/generations/${generationId}/cancel`, {
                method: "POST",
                headers: { authorization: `Bearer ${options.key}` },
              });
              record.cancelStatus = cancel.status;
            }
            if (first && options.dropAfter === count) {
              record.dropped = true;
              await reader.cancel(); // closes the connection
              controller.error(new TypeError("network error")); // what a lost connection looks like to fetch
            }
            return;
          }
          const { done, value } = await reader.read();
          if (done) {
            if (buffer.trim()) record.trailing = buffer;
            controller.close();
            return;
          }
          buffer += decoder.decode(value, { stream: true });
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

function makeChat(options, connections, finishes, errors) {
  const transport = new DefaultChatTransport({
    api: `${options.baseUrl}/api/ai-sdk/chat`,
    headers: { authorization: `Bearer ${options.key}` },
    body: options.body,
    fetch: recordingFetch(options, connections),
  });
  return new AbstractChat({
    id: options.conversationId,
    transport,
    state: new State(options.initialMessages ?? []),
    onFinish: ({ isAbort, isDisconnect, isError, finishReason }) =>
      finishes.push({ isAbort, isDisconnect, isError, finishReason: finishReason ?? null }),
    onError: (error) => errors.push(String(error?.message ?? error)),
  });
}

function report(chat, connections, finishes, errors) {
  return {
    status: chat.status,
    error: chat.error ? String(chat.error.message ?? chat.error) : null,
    messages: chat.messages,
    connections,
    finishes,
    errors,
  };
}

async function chatCommand(options) {
  const connections = [];
  const finishes = [];
  const errors = [];
  const chat = makeChat(options, connections, finishes, errors);
  const message = { role: "user", parts: [{ type: "text", text: options.text }] };
  if (options.messageId) message.id = options.messageId;
  await chat.sendMessage(message);
  const afterSend = { status: chat.status, messages: structuredClone(chat.messages) };
  if (options.resume) await chat.resumeStream();
  return { ...report(chat, connections, finishes, errors), afterSend };
}

async function resumeCommand(options) {
  const connections = [];
  const finishes = [];
  const errors = [];
  const chat = makeChat(options, connections, finishes, errors);
  await chat.resumeStream();
  return report(chat, connections, finishes, errors);
}

async function readCommand() {
  const input = [];
  for await (const piece of process.stdin) input.push(piece);
  const bytes = Buffer.concat(input);
  const transport = new DefaultChatTransport();
  const errors = [];
  const stream = transport.processResponseStream(
    new ReadableStream({
      start(controller) {
        controller.enqueue(new Uint8Array(bytes));
        controller.close();
      },
    }),
  );
  let message = null;
  try {
    for await (const snapshot of readUIMessageStream({ stream, onError: (e) => errors.push(String(e)) })) {
      message = snapshot;
    }
  } catch (error) {
    errors.push(String(error?.message ?? error));
  }
  return { message, errors };
}

const [command, raw] = process.argv.slice(2);
const options = raw ? JSON.parse(raw) : {};
const timer = setTimeout(() => {
  console.error(`driver: ${command} did not finish within ${TIMEOUT_MS} ms`);
  process.exit(2);
}, TIMEOUT_MS);
const commands = { chat: chatCommand, resume: resumeCommand, read: readCommand };
if (!commands[command]) {
  console.error(`driver: unknown command ${command}`);
  process.exit(64);
}
const result = await commands[command](options);
clearTimeout(timer);
process.stdout.write(JSON.stringify(result) + "\n");
