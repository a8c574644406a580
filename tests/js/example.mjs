// A chatstream answer through the AI SDK's own client code, from Node (docs/ai-sdk.md).
//
//   cd tests/js && npm ci
//   node example.mjs http://127.0.0.1:8000 cs_…your key… "Hello agent"
//
// Starts a conversation with the first agent the key sees, sends the message through
// DefaultChatTransport (what useChat uses) and prints the answer's UI message parts as they
// grow, then the final UI message as JSON.

import { DefaultChatTransport, readUIMessageStream } from "ai";

const [baseUrl = "http://127.0.0.1:8000", key, text = "Hello from the AI SDK"] = process.argv.slice(2);
if (!key) {
  console.error("usage: node example.mjs <base url> <api key> [message]");
  process.exit(64);
}
const headers = { authorization: `Bearer ${key}` };

async function api(path, init = {}) {
  const response = await fetch(`${baseUrl}${path}`, {
    ...init,
    headers: { ...headers, "content-type": "application/json", ...init.headers },
  });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

// Our REST API: an agent and a conversation (its id is the AI SDK's chat id).
const agents = await api("/api/agents");
if (agents.length === 0) throw new Error("no agent: create one first (chatstream agent create)");
const conversation = await api("/api/conversations", {
  method: "POST",
  body: JSON.stringify({ agentId: agents[0].id }),
});

// The AI SDK: post the user message, read the UI message stream.
const transport = new DefaultChatTransport({ api: `${baseUrl}/api/ai-sdk/chat`, headers });
const stream = await transport.sendMessages({
  chatId: conversation.id,
  trigger: "submit-message",
  messageId: undefined,
  messages: [{ id: crypto.randomUUID(), role: "user", parts: [{ type: "text", text }] }],
  abortSignal: undefined,
});
let message;
for await (const snapshot of readUIMessageStream({ stream })) {
  message = snapshot;
  const shown = snapshot.parts.filter((p) => p.type !== "step-start").map((p) => (p.text ?? p.type));
  console.error(`… ${shown.join(" | ")}`);
}
console.log(JSON.stringify(message, null, 2));
